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


def tiny_sd_vae(folder: Path):
    """An AutoencoderKL with the SD layout's factor-8 downsampling (4 levels), tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.18215)
    vae.save_pretrained(folder)
    return folder


def tiny_sd_pipeline(folder: Path) -> Path:
    """A Stable Diffusion 1.x-layout pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tmp = folder.parent / (folder.name + "-parts")
    tiny_clip(tmp / "clip")
    tiny_sd_vae(tmp / "vae")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(tmp / "vae"), text_encoder=CLIPTextModel.from_pretrained(tmp / "clip"),
        tokenizer=CLIPTokenizer.from_pretrained(tmp / "clip"), unet=unet,
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


def tiny_model_with_card(folder: Path) -> Path:
    """A tiny SD pipeline folder plus the model_card.json a training run writes (for serving tests)."""
    tiny_sd_pipeline(folder)
    card = {"kind": "emoji-ldm model", "preset": "tiny-test", "dataset": "s3://data/emoji", "dataset_version": 3,
            "latent_table": "s3://data/latents", "latent_table_version": 1, "code_version": "test"}
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder
