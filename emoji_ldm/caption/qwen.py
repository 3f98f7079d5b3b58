"""The `qwen2.5-vl` captioner: transformers Qwen2_5_VLForConditionalGeneration, batched, in a Ray Data actor.

Inputs are built from the tokenizer and `Qwen2VLImageProcessorPil` rather than
the Qwen processor class, which needs torchvision (it does not import beside
the torch pinned here). The chat text is the model's own template written out:
one user turn with the image and the instruction; `<|image_pad|>` is repeated
once per merged vision patch (`image_grid_thw.prod() // merge_size**2`).
"""

from __future__ import annotations

import io
import logging

from emoji_ldm.caption.prompt import clean_caption, render
from emoji_ldm.runtime.heap import release_free_heap

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
SYSTEM = "You are a helpful assistant."
# Emoji are small: both captioners scale them up to about this many pixels so the vision tower sees detail.
# A 64x64 emoji becomes 224x224: 16x16 patches of 14 px, 8x8 = 64 visual tokens after the 2x2 merge (at the
# processor's own minimum, 56x56, it would be 4).
IMAGE_PIXELS = 224 * 224
MAX_IMAGE_PIXELS = 256 * 256


def image_size_kwargs(image_pixels: int = IMAGE_PIXELS) -> dict:
    """The Qwen2-VL image processor's size bounds: the transformers captioner's `from_pretrained` kwargs and
    the vLLM engine's `mm_processor_kwargs`, so both show the model the same image."""
    return {"min_pixels": image_pixels, "max_pixels": max(image_pixels, MAX_IMAGE_PIXELS)}


def chat_text(instruction: str, image_tokens: int) -> str:
    pads = "<|image_pad|>" * image_tokens
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n<|vision_start|>{pads}<|vision_end|>{instruction}<|im_end|>\n"
            f"<|im_start|>assistant\n")


class QwenCaptioner:
    """One model per actor; `__call__` captions a batch with one left-padded `generate` call.

    A row whose image does not decode is recorded with its reason and left out of the
    batch; if the batched call itself fails, the rows are retried one by one so a single
    bad input costs only its own caption.
    """

    def __init__(self, model: str, template: str, max_new_tokens: int = 128, device: str = "cpu",
                 image_pixels: int = IMAGE_PIXELS):
        import torch
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.images = Qwen2VLImageProcessorPil.from_pretrained(model, **image_size_kwargs(image_pixels))
        self.merge = self.images.merge_size
        self.template, self.max_new_tokens, self.device = template, max_new_tokens, device
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        ids, captions, errors = list(batch["id"]), [None] * len(batch["id"]), [None] * len(batch["id"])
        good, pictures = [], []
        for i, png in enumerate(batch["image"]):
            try:
                with Image.open(io.BytesIO(png)) as im:
                    pictures.append(im.convert("RGB"))
                good.append(i)
            except Exception as e:
                errors[i] = f"decode: {type(e).__name__}: {e}"[:200]
        titles = [batch["title"][i] for i in good]
        try:
            texts = self.generate(pictures, titles)
        except Exception as e:  # isolate: one row at a time
            logger.warning("batched generate failed (%s); captioning %d rows one by one", e, len(good))
            texts = []
            for picture, title in zip(pictures, titles):
                try:
                    texts.append(self.generate([picture], [title])[0])
                except Exception as one:
                    texts.append(one)
        for i, text in zip(good, texts):
            if isinstance(text, Exception):
                errors[i] = f"generate: {type(text).__name__}: {text}"[:200]
            elif not text:
                errors[i] = "empty generation"
            else:
                captions[i] = text
        passed = {"_file": batch["_file"]} if "_file" in batch else {}  # the data file each row came from
        release_free_heap()  # the batch's freed activations back to the OS, as bulk's actor does
        return {"id": ids, "caption": captions, "error": errors, **passed}

    def generate(self, pictures: list, titles: list) -> list[str]:
        """Cleaned captions for images with titles, one `generate` call."""
        import torch

        vision = self.images(images=pictures, return_tensors="pt")
        grid = vision["image_grid_thw"]  # (N, 3): temporal, height, width patches per image
        texts = [chat_text(render(self.template, title), int(g.prod()) // self.merge**2)
                 for g, title in zip(grid, titles)]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True)
        inputs = {**inputs, "pixel_values": vision["pixel_values"], "image_grid_thw": grid}
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if self.device == "cuda":
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        self.calls += 1
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]  # (N, new tokens): only what the model wrote
        return [clean_caption(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
