"""Animated emoji: the cost of a loop against stills, and the noise circle against a prompt morph.

    .venv/bin/python bench/animation.py [--model demo-out/run] [--frames 12] [--steps 20] [--repeat 3]

1. cost: images/s of `Sampler.sample` drawing still emoji against frames/s of `Sampler.animate` drawing the
   frames of one loop, same model, steps and batch (the loop's frames are one batch, as the stills are);
2. the loop's path, measured on the same prompts and seeds with `animation.loop_metrics`: frames from noise on
   a small circle around the seed's noise (what `--frames` draws) against a prompt morph and back (each prompt
   to a neighbour's and back, by interpolating the text encoder's embeddings, from the seed's own noise).

Without --model (or when it is missing) a tiny random pipeline stands in: the cost holds for any model of its
size, the metrics of the path say nothing of a trained one.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, repeat, row, timed, write_record  # noqa: E402

PROMPTS = ("red heart", "smiling cat face", "yellow star", "blue circle")


def load_sampler(model: str | None):
    from emoji_ldm.inference.sampler import Sampler

    if model and Path(model).exists():
        return Sampler.load(model), model
    from tests.tiny_models import tiny_model_with_card

    folder = tiny_model_with_card(Path(tempfile.mkdtemp()) / "tiny")
    return Sampler.load(str(folder)), "tiny random pipeline (tests/tiny_models.py)"


def morph_frames(sampler, prompt: str, other: str, seed: int, frames: int, steps: int):
    """A prompt morph and back: frame k uses the text embedding (1 - w) * E(prompt) + w * E(other),
    w = (1 - cos(2 pi k / N)) / 2, from the seed's own noise."""
    import torch

    pipe = sampler.pipe
    embed = pipe.encode_prompt([prompt, other], "cpu", 1, True, negative_prompt=["", ""])
    cond, uncond = embed[0], embed[1]  # (2, T, D) each
    w = torch.tensor([(1 - math.cos(2 * math.pi * k / frames)) / 2 for k in range(frames)]).view(-1, 1, 1)
    cond_k = (1 - w) * cond[:1] + w * cond[1:]  # (N, T, D)
    latents = sampler.noise(seed).repeat(frames, 1, 1, 1)  # (N, C, h, w)
    pipe.scheduler = sampler._schedulers["dpmpp"]
    with torch.no_grad():
        out = pipe(prompt_embeds=cond_k, negative_prompt_embeds=uncond[:1].repeat(frames, 1, 1),
                   num_inference_steps=steps, guidance_scale=5.0, latents=latents)
    from emoji_ldm.inference.sampler import to_rgba

    return [to_rgba(im, sampler.alpha) for im in out.images]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "demo-out" / "run"))
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from emoji_ldm.inference.animation import AnimationSettings, loop_metrics
    from emoji_ldm.inference.sampler import SampleJob

    sampler, model = load_sampler(args.model)
    n, animation = args.frames, AnimationSettings(frames=args.frames)
    still = SampleJob(("smiling cat face",) * n, tuple(range(n)), steps=args.steps)
    loop = SampleJob(("smiling cat face",), (0,), steps=args.steps)
    sampler.sample([still])  # warm-up
    runs = repeat({"still": lambda i: n / timed(sampler.sample, [still])[0],
                   "loop": lambda i: n / timed(sampler.animate, loop, animation)[0]}, args.repeat, alternate=True,
                  report=lambda i, name, v: print(f"repeat {i}: {name} {v:.2f} images/s", flush=True))

    paths: dict[str, list[dict]] = {"circle": [], "morph": []}
    for i, prompt in enumerate(PROMPTS):
        job = SampleJob((prompt,), (i,), steps=args.steps)
        paths["circle"].append(loop_metrics(sampler.animate(job, animation)[0]))
        paths["morph"].append(loop_metrics(morph_frames(sampler, prompt, PROMPTS[(i + 1) % len(PROMPTS)], i, n,
                                                        args.steps)))
    for name, rows in paths.items():
        print(name, {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]})

    summary = [row("animation", f"frames/s of a {n}-frame loop against images/s of stills", runs["loop"],
                   runs["still"], "images/s", goal=">= 0.9", note=f"model: {model}, {args.steps} steps")]
    for metric in ("frame_change", "loop_closure", "flicker"):
        summary.append(row("animation", f"{metric}: noise circle (ours) against a prompt morph",
                           [r[metric] for r in paths["circle"]], [r[metric] for r in paths["morph"]],
                           note=f"{len(PROMPTS)} prompts, model: {model}"))
    write_record("animation", {"images_per_s": runs, "paths": paths, "frames": n, "steps": args.steps,
                               "model": model}, summary)


if __name__ == "__main__":
    main()
