"""The `vllm` captioner: Qwen2.5-VL through `ray.data.llm` on GPU clusters.

vLLM is not a dependency of emoji-ldm (`pip install vllm` in the image the job
runs in): it needs CUDA GPUs, so this captioner is documented and built here but
never run on the CPU machines this project is developed on. The stage hands it
the dataset and gets back rows with `id`, `caption`, `error`, like the other
captioners. The engine's multimodal processor gets the transformers
captioner's image size (`qwen.image_size_kwargs`), so both show the model the
same image for the same model name.
"""

from __future__ import annotations

import base64

from emoji_ldm.caption.prompt import clean_caption, render
from emoji_ldm.caption.qwen import IMAGE_PIXELS, image_size_kwargs
from emoji_ldm.errors import UserError


def processor_config(model: str, concurrency: int, batch_size: int, image_pixels: int = IMAGE_PIXELS):
    """The `ray.data.llm` processor config: vLLM engines whose multimodal processor scales every image as the
    transformers captioner does (`mm_processor_kwargs` reach the Qwen2-VL image processor)."""
    from ray.data.llm import PrepareMultimodalStageConfig, vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={"max_model_len": 4096, "limit_mm_per_prompt": {"image": 1}, "dtype": "bfloat16",
                       "mm_processor_kwargs": image_size_kwargs(image_pixels)},
        concurrency=concurrency,
        batch_size=batch_size,
        # the multimodal preparation stage loads the images named in the chat messages
        prepare_multimodal_stage=PrepareMultimodalStageConfig(enabled=True, chat_template_content_format="openai"),
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
        should_continue_on_error=True,  # a failed row gets __inference_error__, never fails the job
    )


def vllm_caption(ds, model: str, template: str, max_new_tokens: int, concurrency: int, batch_size: int,
                 image_pixels: int = IMAGE_PIXELS):
    """`ds` (id, image, title, _file) -> (id, caption, error, _file), through vLLM engine replicas on Ray."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("the vllm captioner needs vLLM and a CUDA GPU, which emoji-ldm does not install: pip "
                        "install vllm where the job runs (driver and GPU workers), or use --captioner qwen2.5-vl"
                        ) from None
    from ray.data.llm import build_processor

    config = processor_config(model, concurrency, batch_size, image_pixels)

    def preprocess(row: dict) -> dict:
        url = "data:image/png;base64," + base64.b64encode(row["image"]).decode()
        return {
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": render(template, row["title"])},
            ]}],
            "sampling_params": {"temperature": 0.0, "max_tokens": max_new_tokens},
            "id": row["id"],
            "_file": row["_file"],
        }

    def postprocess(row: dict) -> dict:
        text = clean_caption(row.get("generated_text") or "")
        return {"id": row["id"], "caption": text or None, "error": None if text else "empty generation",
                "_file": row["_file"]}

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    rows = processor(ds)
    # rows that failed inference bypass postprocess and carry the engine's message instead
    return rows.map(lambda r: r if "caption" in r else {
        "id": r["id"], "caption": None, "error": f"generate: {r.get('__inference_error__', 'failed')}"[:200],
        "_file": r["_file"]})
