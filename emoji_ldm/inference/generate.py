"""The `generate` command: emoji PNGs and a sheet from a trained model folder.

    emoji-ldm generate --model URI --prompt TEXT [--negative-prompt TEXT] [--n 4] [--steps 25]
                       [--guidance G] [--seed S] [--scheduler dpmpp|ddim|ddpm] [--size PX]
                       [--target raw|slack|discord|github] [--frames N --format apng|gif|webp
                       --motion 0.3 --fps 12 --matte light|dark|#rrggbb] [--no-png-metadata] --out DIR

Every PNG written carries its generation parameters and the model's URI and
content id as text chunks (`emoji_ldm.inference.pngmeta`), unless turned off.
With `--frames N` each image is an animated loop of N frames drawn by the model
(`emoji_ldm.inference.animation`), fitted under the target's byte cap.
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
from emoji_ldm.inference.animation import (
    EXTENSIONS,
    AnimationSettings,
    encode_loop,
    loop_metrics,
    loop_record,
    loop_text,
)
from emoji_ldm.inference.pngmeta import shared_params
from emoji_ldm.inference.provenance import SigningKeys, lineage_of, sign_set, signed_files
from emoji_ldm.inference.sampler import SampleJob, Sampler, image_grid, inference_device, model_card, png_bytes
from emoji_ldm.inference.settings import SamplerSettings
from emoji_ldm.inference.targets import TARGETS, fit, get_target


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
    target: str = opt("raw", help=f"size and byte cap of the files: {' | '.join(TARGETS)} (raw: as drawn)")
    animation: AnimationSettings = opt(default_factory=AnimationSettings, help="an animated loop per image")

    def __post_init__(self):
        if not self.prompt or not self.prompt.strip():
            raise UserError("--prompt is empty: describe the emoji, e.g. 'smiling cat face'")
        get_target(self.target)
        self.animation.check_scheduler(self.sampler.scheduler)


def generate(config: GenerateConfig) -> list[str]:
    """Write `count` emoji (PNGs, or animated loops with --frames) and a sheet for one prompt; returns the
    paths."""
    settings = config.sampler
    sampler = Sampler.load(config.model, device=inference_device(config.use_gpu))
    seeds = tuple(settings.seed + i for i in range(settings.count))
    job = sampler.resolve(SampleJob.of((config.prompt,) * settings.count, seeds, settings))  # the card's guidance
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = SigningKeys.from_env()  # the operator's C2PA keys (EMOJI_LDM_C2PA_CERT / _KEY); None: unsigned
    card = model_card(sampler.model_uri) if keys else None
    if config.animation.animated:
        files, records, stills = _write_loops(sampler, job, config, out, keys, card)
    else:
        (made,) = sampler.pngs([job], config.png_metadata)
        files, records, stills = [], [p for _, p in made], [Image.open(io.BytesIO(png)) for png, _ in made]
        target = get_target(config.target)
        for i, (png, params) in enumerate(made):
            files.append(out / f"{i:03d}.png")
            _write(out, files[-1].name, fit(png, target), lineage_of(params, card), keys, target)
    params = [r.get("params", r) for r in records]
    sheet = image_grid(stills, [f"seed {s}" for s in seeds])
    sheet_png = png_bytes(sheet, shared_params(params) if config.png_metadata else None)
    if keys is not None:  # the sheet carries the run's manifest, the images as its ingredients
        sheet_png = sign_set(sheet_png, {f.name: f.read_bytes() for f in files},
                             lineage_of({"model": sampler.model_uri, "seed": settings.seed}, card), keys)
    (out / "sheet.png").write_bytes(sheet_png)
    paths = [str(f) for f in files]
    (out / "generate.json").write_text(json.dumps(
        {**dataclasses.asdict(config), "model_uri": sampler.model_uri, "model_content_id": sampler.content_id,
         "files": paths, "images": records}, indent=2))
    return paths


def _write(out: Path, name: str, data: bytes, lineage: dict, keys: SigningKeys | None, target) -> None:
    """The file, C2PA-signed with `keys` (and its .c2pa sidecar when the manifest does not fit the target's cap)."""
    for file, blob in signed_files(name, data, lineage, keys, target).items():
        (out / file).write_bytes(blob)


def _write_loops(sampler: Sampler, job: SampleJob, config: GenerateConfig, out: Path,
                 keys: SigningKeys | None = None, card: dict | None = None):
    """Each image of `job` as an animated loop under the target's cap: (files, per-file records, first frames).
    A record holds the image's parameters, the loop (frames, motion, fps), what fitting kept, and the loop's
    metrics."""
    animation, target = config.animation, get_target(config.target)
    files, records, stills = [], [], []
    for i, frames in enumerate(sampler.animate(job, animation)):
        params = job.image_params(i, frames[0].width, frames[0].height, sampler.model_uri, sampler.content_id)
        loop, text = loop_record(animation), loop_text(animation)
        encoded = encode_loop(frames, animation, target.max_bytes, target.size,
                              {**params, "loop": text} if config.png_metadata else None)
        files.append(out / f"{i:03d}{EXTENSIONS[animation.format]}")
        _write(out, files[-1].name, encoded.data, lineage_of(params, card), keys, target)
        records.append({"params": params, "loop": loop, "file": encoded.record(), "metrics": loop_metrics(frames)})
        stills.append(frames[0])
    return files, records, stills


def report(paths: list[str]) -> str:
    folder = Path(paths[0]).parent if paths else "?"
    return f"generate: {len(paths)} images and sheet.png in {folder}"
