"""The demo's model before and after a change of its recipe: `make demo`'s own eval, wall times, colour words.

    .venv/bin/python bench/demo_quality.py --before-ref REF --out DIR       # runs both demos, then records
    .venv/bin/python bench/demo_quality.py --before DIR1 --after DIR2       # records two finished demo runs

Each side is one whole `infra/demo.sh` run (build, caption, judge, encode, train, generate, set, eval): the
before side from a git worktree of REF (its own recipe and its own judge), the after side from this checkout.
Its figures: the demo's eval (`OUT/eval.json`: prompt accuracy beside the judge's ceiling, emoji-FID, the VAE's
error as seen on mid-grey), the wall time of every step (`OUT/timings.txt`) and the machine's load around the
run, and whether the model follows colour words: for each of six colours, "<colour> heart" from 8 seeds; a
sample counts when the hue family of its opaque pixels' dominant colour (as the `metadata` captioner names
colours) is the prompt's colour. Each side is measured by its own judge, trained on its own Twemoji (`--cross-judge`:
the after model by the before side's judge too, the same instrument on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from common import REPO, git, row, run_timed, write_record

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SEEDS = 8


def load() -> float:
    return os.getloadavg()[0]


def run_demo(repo: Path, out: Path, port: int) -> dict:
    """One `infra/demo.sh` of `repo` into `out` (with this checkout's .venv); its wall time and the load."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",) and not k.startswith("DEMO_")}
    before = load()
    with open(f"{out}.log", "w") as log:
        seconds, r = run_timed(["bash", repo / "infra" / "demo.sh", out, str(port)], check=False, env=env,
                               stdout=log, stderr=subprocess.STDOUT, cwd=repo)
    if r.returncode:
        raise SystemExit(f"{repo}/infra/demo.sh {out} failed ({r.returncode}); see {out}.log")
    return {"wall_s": round(seconds, 1), "load_1min_start": before, "load_1min_end": load()}


def worktree(ref: str, where: Path) -> Path:
    """A detached worktree of `ref` using this checkout's .venv (the package is installed editable from here,
    so the worktree's infra/ scripts run this checkout's `emoji-ldm`: only the recipe in the scripts differs)."""
    if not where.exists():
        git("worktree", "add", "--detach", str(where), ref)
        (where / ".venv").symlink_to(REPO / ".venv")
    return where


def timings(out: Path) -> dict:
    steps = {}
    for line in (out / "timings.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "s":
            steps[parts[0]] = float(parts[1])
    return steps


def colour_of(img) -> str | None:
    """The hue family ("red", "blue", ...) of the dominant colour of an RGBA image's opaque pixels."""
    import numpy as np

    from emoji_ldm.caption.metadata import dominant_colours

    rgba = np.asarray(img.convert("RGBA"))
    opaque = rgba[..., :3][rgba[..., 3] >= 128]  # (N, 3)
    names = dominant_colours(opaque, None, top=1) if len(opaque) else []
    return names[0].split()[-1] if names else None


def colour_words(model: Path) -> dict:
    """Per colour, the share of "<colour> heart" samples (seeds 0..SEEDS-1) drawn in that hue family."""
    from emoji_ldm.inference.sampler import ImageAlpha, load_pipeline, model_card, run_pipeline

    pipe = load_pipeline(str(model))
    alpha = ImageAlpha.of(model_card(str(model)))
    got = {}
    for colour in COLOURS:
        images = run_pipeline(pipe, [f"{colour} heart"] * SEEDS, steps=25, guidance=5.0, seed=0, alpha=alpha)
        drawn = [colour_of(im) for im in images]
        got[colour] = {"share": sum(d == colour for d in drawn) / SEEDS, "drawn": drawn}
    got["mean"] = sum(got[c]["share"] for c in COLOURS) / len(COLOURS)
    return got


def side(out: Path) -> dict:
    e = json.loads((out / "eval.json").read_text())
    v = e.get("vae_reconstruction") or {}
    return {"prompt_accuracy": e["prompt_accuracy"], "real_accuracy": e["real_accuracy"], "emoji_fid": e["emoji_fid"],
            "vae_visible_mse": v.get("visible_mse"), "heldout_loss": e.get("heldout_loss"),
            "dataset": e.get("dataset"), "steps_s": timings(out), "colour_words": colour_words(out / "run"),
            "with_before_judge": _cross(out / "eval-before-judge.json")}


def _cross(path: Path) -> dict | None:
    """The after model's eval by the before side's judge (`--cross-judge`): the same instrument on both sides."""
    if not path.exists():
        return None
    e = json.loads(path.read_text())
    return {k: e[k] for k in ("prompt_accuracy", "real_accuracy", "emoji_fid")}


def cross_judge(before: Path, after: Path) -> None:
    target = after / "eval-before-judge.json"
    if not target.exists():
        run_timed([REPO / ".venv" / "bin" / "emoji-ldm", "eval", "--model", after / "run", "--data", after / "latents",
                   "--judge", before / "judge", "--out", target], env={**os.environ, "RAY_ADDRESS": ""})


def summary(b: dict, a: dict) -> list[dict]:
    area = "make: demo quality"
    note = "each side by its own judge (ceiling: {:.0%} before, {:.0%} after)".format(b["real_accuracy"],
                                                                                   a["real_accuracy"])
    if "load_1min_start" in b and "load_1min_start" in a:
        note += "; 1-min load at start and end: {:.0f}, {:.0f} before; {:.0f}, {:.0f} after".format(
            b["load_1min_start"], b["load_1min_end"], a["load_1min_start"], a["load_1min_end"])
    rows = [
        row(area, "demo eval: prompt accuracy, after vs before", 100 * a["prompt_accuracy"],
            100 * b["prompt_accuracy"], "%", ">= 30", note),
        row(area, "demo eval: emoji-FID (lower is better), after vs before", a["emoji_fid"], b["emoji_fid"], "",
            "<= 30"),
        row(area, "colour words: \"<colour> heart\" drawn in that colour, after vs before",
            100 * a["colour_words"]["mean"], 100 * b["colour_words"]["mean"], "%"),
        row(area, "demo wall time, after vs before (same machine, one after the other)", a["wall_s"] / 60,
            b["wall_s"] / 60, "min"),
    ]
    if a.get("with_before_judge"):
        x = a["with_before_judge"]
        rows.insert(1, row(area, "the same, the after model by the before side's judge",
                           100 * x["prompt_accuracy"], 100 * b["prompt_accuracy"], "%", None,
                           f"ceiling {x['real_accuracy']:.0%} on the after side's held-out rows"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="a finished demo run (OUT of infra/demo.sh): the before side")
    parser.add_argument("--after", type=Path, help="a finished demo run: the after side")
    parser.add_argument("--before-ref", help="run the before side: infra/demo.sh of this git ref (a worktree)")
    parser.add_argument("--out", type=Path, default=Path("demo-out/bench-demo-quality"),
                        help="where --before-ref's runs go (before/, after/)")
    parser.add_argument("--cross-judge", action="store_true",
                        help="also score the after model with the before side's judge (AFTER/eval-before-judge.json)")
    parser.add_argument("--wall", type=json.loads, default={},
                        help='with --before/--after: their wall times and loads, e.g. \'{"before": {"wall_s": 900, '
                             '"load_1min_start": 3, "load_1min_end": 4}, "after": {...}}\'')
    parser.add_argument("--note", default="", help="what the two sides are, for the record (e.g. their recipes)")
    args = parser.parse_args()
    if args.before_ref:
        args.out.mkdir(parents=True, exist_ok=True)
        tree = worktree(args.before_ref, args.out.resolve() / "tree")
        args.before, args.after = args.out.resolve() / "before", args.out.resolve() / "after"
        args.wall = {"before": run_demo(tree, args.before, 8421), "after": run_demo(REPO, args.after, 8422)}
    elif not (args.before and args.after):
        parser.error("give --before-ref REF, or --before DIR and --after DIR")
    if args.cross_judge:
        cross_judge(args.before, args.after)
    sides = {name: {"wall_s": timings(d).get("total"), **args.wall.get(name, {}), **side(d)}
             for name, d in (("before", args.before), ("after", args.after))}
    for name, s in sides.items():
        print(f"{name}: prompt accuracy {s['prompt_accuracy']:.1%} (ceiling {s['real_accuracy']:.1%}), emoji-FID "
              f"{s['emoji_fid']:.1f}, colour words {s['colour_words']['mean']:.0%}, VAE as seen "
              f"{s['vae_visible_mse']:.4f}, wall {s['wall_s'] / 60:.1f} min ({s['dataset']})")
    write_record("demo_quality", sides, summary(sides["before"], sides["after"]),
                 about="`infra/demo.sh` before and after its recipe change, each with its own judge; colour words: "
                       "six \"<colour> heart\" prompts x 8 seeds" + (f"; {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
