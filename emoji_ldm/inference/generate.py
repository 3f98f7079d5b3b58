"""The `generate` command: emoji PNGs and a sheet from a trained model folder.

    emoji-ldm generate --model URI --prompt TEXT [--negative-prompt TEXT] [--n 4] [--steps 25]
                       [--guidance 5.0] [--seed S] [--scheduler dpmpp|ddim|ddpm] [--size PX]
                       [--no-png-metadata] --out DIR

Every PNG written carries its generation parameters and the model's URI and
content id as text chunks (`emoji_ldm.inference.pngmeta`), unless turned off.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.inference.pngmeta import shared_params
from emoji_ldm.inference.sampler import SampleJob, Sampler, image_grid, inference_device, png_bytes
from emoji_ldm.inference.settings import SamplerSettings


@dataclass(frozen=True)
class GenerateConfig:
    model: str = opt(help="a model folder/URI (or a training --out)")
    prompt: str = opt(help="what to draw, e.g. 'smiling cat face'")
    out: str = opt(help="a local folder for the PNGs and sheet.png")
    sampler: SamplerSettings = opt(default_factory=SamplerSettings, help="sampler settings",
                                   rename={"count": "n"})
    png_metadata: bool = opt(True, flag="no-png-metadata", invert=True,
                             help="write the PNGs without their generation parameters and model id")
    use_gpu: bool = opt(False, flag="gpu", help="draw on a GPU (cuda, the pipeline in bf16); default CPU")

    def __post_init__(self):
        if not self.prompt or not self.prompt.strip():
            raise UserError("--prompt is empty: describe the emoji, e.g. 'smiling cat face'")


def generate(config: GenerateConfig) -> list[str]:
    """Write `count` PNGs and a sheet for one prompt; returns the PNG paths."""
    settings = config.sampler
    sampler = Sampler.load(config.model, device=inference_device(config.use_gpu))
    seeds = tuple(settings.seed + i for i in range(settings.count))
    (made,) = sampler.pngs([SampleJob.of((config.prompt,) * settings.count, seeds, settings)], config.png_metadata)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (png, _) in enumerate(made):
        path = out / f"{i:03d}.png"
        path.write_bytes(png)
        paths.append(str(path))
    params = [p for _, p in made]
    sheet = image_grid([Image.open(io.BytesIO(png)) for png, _ in made], [f"seed {s}" for s in seeds])
    (out / "sheet.png").write_bytes(png_bytes(sheet, shared_params(params) if config.png_metadata else None))
    (out / "generate.json").write_text(json.dumps(
        {**dataclasses.asdict(config), "model_uri": sampler.model_uri, "model_content_id": sampler.content_id,
         "files": paths, "images": params}, indent=2))
    return paths


def report(paths: list[str]) -> str:
    folder = Path(paths[0]).parent if paths else "?"
    return f"generate: {len(paths)} images and sheet.png in {folder}"
