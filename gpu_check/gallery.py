"""`make gpu-train` after training: the EMA weights as a pipeline folder loaded by the Sampler, the gallery and the
naming sheet, and the eval (unseen colour combinations, then the frozen judge's prompt accuracy with its baselines)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emoji_ldm.errors import UserError
from emoji_ldm.eval.naming import options_only
from gpu_check.bundle import Data

if TYPE_CHECKING:
    from gpu_check.train import RunConfig


def export(preset, ema, folder: Path, device, alpha: str = "vae"):
    """The EMA weights in a standard pipeline folder (as `train` exports one), loaded back by the Sampler."""
    from emoji_ldm.inference.sampler import InferenceOptions, Sampler
    from emoji_ldm.models.builders import build_unet, configure_trainable
    from emoji_ldm.train.export import assemble_pipeline

    unet = build_unet(preset)
    ema.copy_to(configure_trainable(unet, preset))
    assemble_pipeline(unet.float().eval(), preset, "").save_pretrained(folder, safe_serialization=True)
    card = {"image": {"alpha": alpha}, "preset": preset.to_dict(), "trained_by": "gpu_check/train.py"}
    (folder / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
    return Sampler.load(str(folder), device=device.type, options=InferenceOptions(dtype="auto"))


def sample(sampler, prompts: list[str], seeds: list[int], config: RunConfig):
    from emoji_ldm.inference.sampler import SampleJob

    job = SampleJob(tuple(prompts), tuple(seeds), steps=config.sample_steps)
    return sampler.sample([job], max_batch=512 if config.cuda else 64)[0]


def sheets(sampler, meta: dict, config: RunConfig) -> dict:
    """The gallery (a prompt per row, `seeds` seeds each) and the naming sheet (one unlabelled tile per everyday
    emoji, in the bundle's shuffled order; the options without answers, and the key, in separate files)."""
    from emoji_ldm.inference.images import image_grid

    start = time.perf_counter()
    prompts = [p for p in meta["gallery"] for _ in range(config.seeds)]
    images = sample(sampler, prompts, [s for _ in meta["gallery"] for s in range(config.seeds)], config)
    image_grid(images, prompts, columns=config.seeds).save(config.out / "gallery.png")
    tiles = meta["naming_sheet"]
    drawn = sample(sampler, [t["answer"] for t in tiles], [0] * len(tiles), config)
    image_grid(drawn, [str(t["tile"]) for t in tiles], columns=6).save(config.out / "naming-sheet.png")
    (config.out / "naming-options.json").write_text(json.dumps(options_only(tiles), indent=1))
    (config.out / "naming-key.json").write_text(json.dumps({"seed": 0, "tiles": tiles}, indent=1))
    return {"gallery_images": len(images), "naming_tiles": len(drawn), "seconds": time.perf_counter() - start}


def colour_share(sampler, prompt: str, config: RunConfig, n: int) -> float:
    """The share of `n` seeds of `prompt` ("purple cat face") whose dominant colours include the one asked."""
    from emoji_ldm.caption.metadata import dominant_colours

    asked, hits = prompt.split()[0], 0
    for image in sample(sampler, [prompt] * n, list(range(n)), config):
        rgba = np.asarray(image.convert("RGBA"))
        opaque = rgba[..., :3][rgba[..., 3] >= 128]  # (N, 3)
        hits += bool(len(opaque)) and asked in {c.split()[-1] for c in dominant_colours(opaque, None)}
    return hits / n


def evaluate(sampler, data: Data, config: RunConfig) -> dict:
    """Unseen colour combinations (no judge needed), then, with the frozen judge, the eval protocol's prompt
    accuracy (`emoji_ldm.eval.protocol`: per held-out caption, `eval_seeds` samples each, 95% bootstrap intervals)
    beside the real held-out Twemoji images and the empty prompt, on the same captions."""
    from PIL import Image

    from emoji_ldm.eval.protocol import caption_scores, prompt_accuracy_figures, summary_line

    meta = data.meta
    out = {"unseen_colour_share": {p: colour_share(sampler, p, config, 4 * config.eval_seeds) for p in meta["unseen"]}}
    try:
        from emoji_ldm.eval.frozen_judge import frozen_judge

        judge = frozen_judge()
    except (ImportError, UserError) as e:
        return {**out, "judge": None, "skipped": f"no frozen judge: {type(e).__name__}: {e}"}
    prompts = [p for p in meta["eval_prompts"] if p["label"] in judge.classes][:config.eval_prompts]
    if not prompts:
        return {**out, "judge": judge.meta.get("content_id"), "skipped": "no held-out prompt has a judge class"}
    k, truth = config.eval_seeds, [p["label"] for p in prompts]
    drawn = sample(sampler, [p["prompt"] for p in prompts for _ in range(k)], list(range(k)) * len(prompts), config)
    first: dict[str, int] = {}
    for i, (name, style) in enumerate(zip(meta["names"], meta["style_of_row"])):
        if style == "twemoji":
            first.setdefault(name, i)
    real = data.images[[first[p["prompt"]] for p in prompts]].permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 4)
    empty = sample(sampler, [""] * len(prompts), list(range(len(prompts))), config)
    index = {c: i for i, c in enumerate(judge.classes)}
    per_row = {"model": caption_scores(judge.predict(judge.pixels(drawn)), truth, k),
               "real": caption_scores(judge.predict(judge.pixels([Image.fromarray(a, "RGBA") for a in real])),
                                      truth, 1)}
    empty_classes = np.array([index[c] for c in judge.predict(judge.pixels(empty))])
    figures = prompt_accuracy_figures(per_row, [p.get("group") for p in prompts],
                                      (empty_classes, np.array([index[t] for t in truth])))
    return {**out, "judge": judge.meta.get("content_id"), "held_out_prompts": len(prompts), "seeds_per_prompt": k,
            "summary": summary_line(figures), "prompt_accuracy": figures}
