"""Generate emoji from a trained model folder (a standard diffusers StableDiffusionPipeline).

    emoji-ldm generate --model URI --prompt TEXT [--negative-prompt TEXT] [--n 4] [--steps 25]
                       [--guidance 5.0] [--seed S] [--scheduler dpmpp|ddim|ddpm] --out DIR
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from emoji_ldm.errors import UserError

logger = logging.getLogger(__name__)


def model_folder(uri: str) -> str:
    """A local folder holding `model_index.json`: `uri` itself or `uri/model` (a training output)."""
    from emoji_ldm.store.artifacts import exists, local_copy
    from emoji_ldm.store.uri import join, normalize_uri

    uri = normalize_uri(uri)
    if not exists(join(uri, "model_index.json")) and exists(join(uri, "model", "model_index.json")):
        uri = join(uri, "model")
    if not exists(join(uri, "model_index.json")):
        raise UserError(f"no model at {uri!r}: expected a diffusers pipeline folder with model_index.json")
    return local_copy(uri)


def load_pipeline(uri: str, scheduler: str = "dpmpp", device: str = "cpu"):
    """StableDiffusionPipeline from a model folder/URI, with the chosen sampler."""
    import torch
    from diffusers import StableDiffusionPipeline

    from emoji_ldm.models.builders import sampling_scheduler

    folder = model_folder(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a BERT text encoder where CLIP is expected: a type warning only
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                       torch_dtype=torch.float32)
    pipe.scheduler = sampling_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def model_card(uri: str) -> dict:
    folder = model_folder(uri)
    path = Path(folder) / "model_card.json"
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class GenerateConfig:
    model: str
    prompt: str
    out: str
    negative_prompt: str = ""
    n: int = 4
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0
    scheduler: str = "dpmpp"

    def __post_init__(self):
        from emoji_ldm.models.builders import SCHEDULERS

        if not self.prompt or not self.prompt.strip():
            raise UserError("--prompt is empty: describe the emoji, e.g. 'smiling cat face'")
        if not 1 <= self.n <= 64:
            raise UserError(f"--n must be from 1 to 64, got {self.n}")
        if not 1 <= self.steps <= 1000:
            raise UserError(f"--steps must be from 1 to 1000, got {self.steps}")
        if self.guidance < 0:
            raise UserError(f"--guidance must be >= 0, got {self.guidance}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}: use one of {', '.join(SCHEDULERS)}")


def run_pipeline(pipe, prompts: list[str], negative: str = "", steps: int = 25, guidance: float = 5.0,
                 seed: int = 0, height: int | None = None) -> list[Image.Image]:
    """One batched pipeline call; prompts longer than the tokenizer limit are truncated with a warning."""
    import torch

    limit = pipe.tokenizer.model_max_length
    too_long = [p for p in prompts if len(pipe.tokenizer(p, verbose=False)["input_ids"]) > limit]
    if too_long:
        logger.warning("%d prompt(s) longer than %d tokens are truncated, e.g. %r", len(too_long), limit,
                       too_long[0][:80])
    size = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompts, negative_prompt=[negative] * len(prompts) if negative else None,
                   num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                   height=size, width=size, output_type="pil")
    return out.images


def image_grid(images: list[Image.Image], labels: list[str] | None = None, cell: int = 96,
               columns: int | None = None) -> Image.Image:
    """A sheet of images (upscaled with nearest neighbour so small emoji stay crisp) with labels."""
    n = len(images)
    cols = columns or min(n, 8)
    rows = math.ceil(n / cols)
    label_h = 16 if labels else 0
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, img in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        sheet.paste(img.convert("RGB").resize((cell - 4, cell - 4), Image.Resampling.NEAREST), (x + 2, y + 2))
        if labels:
            draw.text((x + 3, y + cell - 1), labels[i][:18], fill="black", font=font)
    return sheet


def generate(config: GenerateConfig) -> list[str]:
    """Write `n` PNGs and a sheet for one prompt; returns the PNG paths."""
    pipe = load_pipeline(config.model, config.scheduler)
    images = run_pipeline(pipe, [config.prompt] * config.n, config.negative_prompt, config.steps,
                          config.guidance, config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = out / f"{i:03d}.png"
        img.save(path)
        paths.append(str(path))
    image_grid(images, [f"seed {config.seed} #{i}" for i in range(len(images))]).save(out / "sheet.png")
    (out / "generate.json").write_text(json.dumps({**config.__dict__, "files": paths}, indent=2))
    return paths
