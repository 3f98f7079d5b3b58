"""Tiny randomly initialised stand-ins of the hub models, saved as local folders.

Same classes as the real ones (CLIPTextModel + CLIPTokenizer, an SD-layout
AutoencoderKL that downsamples by 8, an SD 1.x pipeline folder), so the
loading paths of `emoji64` and `sd-finetune` run for real. They prove the code
runs, never a quality result.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def tiny_clip(folder: Path, hidden: int = 32) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + "'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def tiny_sd_vae(folder: Path, channels: int = 3):
    """An AutoencoderKL with the SD layout's factor-8 downsampling (4 levels), tiny widths; `channels` 4 is
    RGBA in and out, as the from-scratch presets' VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.18215)
    vae.save_pretrained(folder)
    return folder


def tiny_sd_pipeline(folder: Path, vae_channels: int = 3, text_encoder: str = "clip") -> Path:
    """A Stable Diffusion 1.x-layout pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    `text_encoder` "clip" is a tiny random CLIPTextModel (32-d); "minilm" the pretrained MiniLM (a BERT, 384-d)
    that the tiny presets use, whose LoRA adapters diffusers loads only with the metadata saved beside them."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, BertModel, CLIPTextModel, CLIPTokenizer

    from emoji_ldm.models.builders import minilm_path

    tmp = folder.parent / (folder.name + "-parts")
    tiny_sd_vae(tmp / "vae", vae_channels)
    if text_encoder == "clip":
        tiny_clip(tmp / "clip")
        encoder, tokenizer = CLIPTextModel.from_pretrained(tmp / "clip"), CLIPTokenizer.from_pretrained(tmp / "clip")
    else:
        assert text_encoder == "minilm", text_encoder
        encoder = BertModel.from_pretrained(minilm_path())  # with its pooler, so that the folder loads whole
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=encoder.config.hidden_size, attention_head_dim=4)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(tmp / "vae"), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_clip_model(folder: Path) -> Path:
    """A full CLIPModel (text + vision towers) with tokenizer and image processor, for the CLIP score."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tiny_clip(folder)  # tokenizer files (and a text model we overwrite)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 76, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                     "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_model_with_card(folder: Path, image: dict | None = None, guidance: float | None = None) -> Path:
    """A tiny SD pipeline folder plus the model_card.json a training run writes (for serving tests); `image`:
    the card's `image` (how the model gets alpha, `encode.image_lineage`); the VAE has its `vae_channels`
    (default 3); `guidance`: the card's own guidance (None: it names none, as a model trained before)."""
    from emoji_ldm.store.artifacts import weights_content_id

    tiny_sd_pipeline(folder, (image or {}).get("vae_channels", 3))
    card = {"kind": "emoji-ldm model", "preset": "tiny-test", "dataset": "s3://data/emoji", "dataset_version": 3,
            "latent_table": "s3://data/latents", "latent_table_version": 1, "code_version": "test",
            "content_id": weights_content_id(folder)}
    if image is not None:
        card["image"] = image
    if guidance is not None:
        card["guidance"] = guidance
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


def tiny_lora(base: Path, folder: Path, instance_prompt: str = "a sks cat emoji") -> Path:
    """A LoRA adapter for the UNet of the pipeline at `base`, in the layout `dreambooth --method lora` writes
    (pytorch_lora_weights.safetensors + model_card.json naming its base). Random A and B, so it changes the
    output; a stand-in for a trained adapter."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from emoji_ldm.store.artifacts import weights_content_id

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    base_card = json.loads((base / "model_card.json").read_text()) if (base / "model_card.json").exists() else {}
    card = {"kind": "emoji-ldm lora", "base_content_id": base_card.get("content_id"),
            "content_id": weights_content_id(folder), "instance_prompt": instance_prompt}
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def tiny_qwen25_vl(folder: Path) -> Path:
    """A randomly initialised Qwen2_5_VLForConditionalGeneration with a small byte-level BPE tokenizer
    (the Qwen special tokens included) and a Qwen2VLImageProcessorPil, saved as a local model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessorPil,
    )

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["describe the emoji: head shape, eyes, mouth, expression, skin colour, action, background colour",
              "a round yellow face with open eyes, a smiling mouth, a happy expression on a white background",
              "user assistant system image title emoji with a red heart blob cat pepe frog green"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tokenizer.save_pretrained(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32, "window_size": 56,
              "fullatt_block_indexes": [1], "in_channels": 3}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
                              pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)
    return folder
