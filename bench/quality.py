"""Which training recipe is better: the `tiny` preset trained twice, same steps and seed, measured offline.

  A. the current recipe (the preset as it is);
  B. the recipe options of diffusers' train_text_to_image.py that should help a short run:
     min-SNR-gamma loss weighting (snr_gamma 5), EMA warm-up (power 3/4, for short runs), a little offset noise.

Both are evaluated by `emoji-ldm eval` with the same emoji judge (`emoji-ldm train-judge` on the same dataset,
Unicode subgroups), the same held-out prompts and seeds. Prints emoji-FID (lower is better), prompt accuracy
(higher is better) and their ratios B vs A, beside the real-data floor and ceiling (`eval --real`).

Needs the dataset of `make demo` (demo-out/twemoji; built when absent); encodes it with `tiny` into WORK/latents.

    python bench/quality.py [--demo-out demo-out] [--steps 1000] [--samples 512] [--b KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, row, run_timed, write_record

BIN = Path(sys.executable).parent
RECIPE_B = ("train.snr_gamma=5", "train.ema_warmup=true", "train.ema_power=0.75", "train.noise_offset=0.05")


def cli(*args: str) -> str:
    seconds, r = run_timed([BIN / "emoji-ldm", *args], cwd=REPO)
    print(f"  emoji-ldm {' '.join(args[:1])}: {seconds:.0f} s", flush=True)
    return r.stdout


def evaluate(work: Path, name: str, args: list[str]) -> dict:
    out = work / f"eval-{name}.json"
    cli("eval", *args, "--out", str(out))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", default="demo-out")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each recipe (the preset's: 1000)")
    parser.add_argument("--samples", type=int, default=512, help="eval samples per model")
    parser.add_argument("--b", action="append", default=None, metavar="KEY=VALUE",
                        help=f"recipe B's overrides (default: {' '.join(RECIPE_B)})")
    parser.add_argument("--work", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    recipe_b = tuple(args.b or RECIPE_B)

    demo = (REPO / args.demo_out).resolve()
    data = demo / "twemoji"
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-quality-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    latents = work / "latents"  # tiny's own (the demo's are pixel32's)
    started = time.time()
    if not (data / "_delta_log").exists():
        print("building the demo dataset (as `make demo` does)", flush=True)
        cli("dataset", "build", "--source", "twemoji", "--out", str(data))
        cli("dataset", "caption", str(data), "--captioner", "metadata")
    if not (latents / "_delta_log").exists():
        cli("encode", "--dataset", str(data), "--preset", "tiny", "--out", str(latents))
    judge = work / "judge"
    if not (judge / "judge.json").exists():
        print(cli("train-judge", "--data", str(data), "--out", str(judge)).strip(), flush=True)

    runs = {"A": (), "B": recipe_b}
    for name, overrides in runs.items():
        run = work / f"run-{name}"
        if not (run / "model" / "model_card.json").exists():
            sets = [a for o in overrides for a in ("--set", o)]
            cli("train", "--data", str(latents), "--preset", "tiny", "--out", str(run), "--workers", "2",
                "--max-steps", str(args.steps), *sets)
    common = ["--data", str(latents), "--judge", str(judge), "--samples", str(args.samples)]
    results = {"floor": evaluate(work, "floor", ["--real", *common])}
    for name in runs:
        results[name] = evaluate(work, name, ["--model", str(work / f"run-{name}"), *common])

    print(f"\ntiny preset, {args.steps} steps each, {args.samples} held-out prompts, judge: "
          f"{results['A']['judge']['classes']} subgroups (held-out accuracy "
          f"{results['A']['judge']['val_accuracy']:.1%})")
    print(f"  recipe B: {' '.join(recipe_b)}")
    print(f"{'':28s} {'emoji-FID':>10s} {'KID':>8s} {'precision':>9s} {'recall':>7s} {'prompt acc':>10s} "
          f"{'held-out loss':>13s}")
    for name, label in (("floor", "real training images (floor)"), ("A", "A: current recipe"),
                        ("B", "B: recipe options")):
        r = results[name]
        loss = "" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}"
        print(f"{label:28s} {r['emoji_fid']:10.2f} {r['emoji_kid']:8.4f} {r['precision']:9.2f} {r['recall']:7.2f} "
              f"{r['prompt_accuracy']:10.1%} {loss:>13s}")
    print(f"ceiling (judge on the held-out images themselves): prompt accuracy {results['A']['real_accuracy']:.1%}")
    a, b = results["A"], results["B"]
    print(f"emoji-FID A/B = {a['emoji_fid'] / b['emoji_fid']:.2f}x (above 1: B is better); prompt accuracy B/A = "
          f"{b['prompt_accuracy'] / max(a['prompt_accuracy'], 1e-9):.2f}x")
    print(f"{os.cpu_count()} cores, {(time.time() - started) / 60:.0f} min; runs in {work}")
    write_record("quality", {"recipe_b": recipe_b, "steps": args.steps, "samples": args.samples, **results}, [
        row("quality", "emoji-FID (lower is better)", b["emoji_fid"], a["emoji_fid"]),
        row("quality", "prompt accuracy (the judge's)", 100 * b["prompt_accuracy"], 100 * a["prompt_accuracy"], "%"),
        row("quality", "held-out denoising loss (lower is better)", b["heldout_loss"], a["heldout_loss"])],
        about=f"`tiny` trained twice, {args.steps} steps, same seed; ours: recipe B ({' '.join(recipe_b)}), "
        "peer: A (the preset's).")


if __name__ == "__main__":
    main()
