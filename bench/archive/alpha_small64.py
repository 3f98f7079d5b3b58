"""Issue 25's figures at `small64`: RGBA against RGB, the same preset and steps, resumable across sessions.

Takes the two captioned Twemoji tables and judges of a `bench/alpha_quality.py` run (`--from`: its RGBA
table, and its `DEMO_BACKGROUND=white` RGB one) and trains `small64` on each:

  1. ours: RGBA Twemoji, the preset as it is (a 4-channel VAE, the model draws alpha);
  2. peer: the RGB (on white) table with `--set vae.channels=3`: `small64` as it was before RGBA.

Each model: `train-vae` (the preset's steps), `encode --vae`, `train` (ZeRO-2 on 2 workers, `--train-steps`
or the preset's), `eval --samples 512` with its own run's judge (the fair pair: the RGBA run's judge, which
sees every image on mid-grey, never saw emoji on white) and, with `--shared-judge`, the RGB model again with
the RGBA run's judge. Every stage is skipped when its output is there, and `train` continues from its last
checkpoint (`--resume`), so a run stopped midway (about 3.5 hours a model at the preset's steps on a slow
2-core machine) goes on where it stopped when started again with the same --out.
Prints what `alpha_quality.py` prints, and each stage's wall time (`OUT/timings.json`, summed over runs).

    .venv/bin/python bench/alpha_small64.py --from /tmp/bench-alpha2 [--out demo-out/alpha-small64]
        [--only rgba|rgb|rgba-premultiplied] [--train-steps N] [--shared-judge]

A model's evaluation is skipped too when its `eval-MODE.json` is there; the figures printed are of every
model evaluated in --out, each against the RGB peer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from alpha_quality import BIN, evaluate, line, pair_rows
from common import run_timed, write_record

# model: (its table and judge, its preset overrides); the pair is rgba and rgb, `--only` trains any one
MODES = {"rgba": ("rgba", []), "rgb": ("rgb", ["--set", "vae.channels=3"]),
         "rgba-premultiplied": ("rgba", ["--set", "vae.colour_loss=premultiplied"])}
PAIR = ("rgba", "rgb")


class Stages:
    """Runs `emoji-ldm` commands of one model, skipping those whose output is there, timing the rest."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / "timings.json"
        out.mkdir(parents=True, exist_ok=True)
        self.timings = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, done: Path, args: list[str]) -> None:
        if done.exists():
            print(f"  {name}: done before ({done})", flush=True)
            return
        with open(self.out / f"{name.replace('/', '-')}.log", "a") as log:
            seconds, r = run_timed([BIN / "emoji-ldm", *args], check=False, env={**os.environ, "RAY_ADDRESS": ""},
                                   stdout=log, stderr=subprocess.STDOUT)
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self.path.write_text(json.dumps(self.timings, indent=2))
        if r.returncode:
            raise SystemExit(f"{name} failed ({r.returncode}); see {self.out}/{name.replace('/', '-')}.log")
        print(f"  {name}: {self.timings[name]:.0f} s", flush=True)


def model(src: Path, out: Path, mode: str, stages: Stages, train_steps: int | None) -> None:
    table, extra = MODES[mode]
    sets, m = ["--preset", "small64", *extra], out / mode
    m.mkdir(parents=True, exist_ok=True)
    data = str(src / table / "twemoji")
    stages.run(f"{mode}/train-vae", m / "vae" / "vae_card.json",
               ["train-vae", "--dataset", data, "--out", str(m / "vae"), *sets])
    stages.run(f"{mode}/encode", m / "latents" / "_delta_log",
               ["encode", "--dataset", data, "--vae", str(m / "vae"), "--out", str(m / "latents"), *sets])
    stages.run(f"{mode}/train", m / "run" / "model" / "model_index.json",
               ["train", "--data", str(m / "latents"), "--out", str(m / "run"), "--workers", "2", "--zero-stage", "2",
                "--channels-last", *sets, *(["--max-steps", str(train_steps)] if train_steps else []),
                *(["--resume"] if (m / "run" / "checkpoints").exists() else [])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="src", required=True, help="a bench/alpha_quality.py --out (tables, judges)")
    parser.add_argument("--out", default="demo-out/alpha-small64")
    parser.add_argument("--only", choices=sorted(MODES), help="train and evaluate only this model now (the pair's "
                        "other later; rgba-premultiplied: the RGBA model with vae.colour_loss=premultiplied)")
    parser.add_argument("--train-steps", type=int, help="UNet steps of both models (default: the preset's 1,500); "
                        "the VAE keeps the preset's")
    parser.add_argument("--shared-judge", action="store_true",
                        help="also evaluate the RGB model with the RGBA run's judge (one feature space, but a "
                        "judge that never saw emoji on white)")
    args = parser.parse_args()
    src, out = Path(args.src).resolve(), Path(args.out).resolve()
    for table in ("rgba", "rgb"):
        if not (src / table / "twemoji" / "_delta_log").exists() or not (src / table / "judge").exists():
            raise SystemExit(f"--from {src}: no {table}/twemoji table or {table}/judge (run bench/alpha_quality.py)")
    stages = Stages(out)
    for mode in [args.only] if args.only else PAIR:
        print(f"{mode}:", flush=True)
        model(src, out, mode, stages, args.train_steps)
        if not (out / f"eval-{mode}.json").exists():  # each model by its own run's judge, once
            evaluate(out / mode, src / MODES[mode][0] / "judge", out / f"eval-{mode}.json", samples=512)
    own = {mode: json.loads((out / f"eval-{mode}.json").read_text()) for mode in MODES
           if (out / f"eval-{mode}.json").exists()}
    results = {"own judges": own}
    if args.shared_judge and "rgb" in own:  # the RGBA model's own judge is the RGBA run's: only RGB again
        shared = out / "eval-rgb-rgba-judge.json"
        results["the RGBA run's judge"] = {
            **{m: r for m, r in own.items() if MODES[m][0] == "rgba"},
            "rgb": json.loads(shared.read_text()) if shared.exists() else
            evaluate(out / "rgb", src / "rgba" / "judge", shared, samples=512)}
    steps, rows = f"{args.train_steps:,} UNet steps" if args.train_steps else "the preset's UNet steps", []
    for name, r in results.items():
        print(f"alpha_small64: small64, {steps}, 512 samples, {name}")
        for mode, e in r.items():
            print(line(mode, e))
        for mode in (m for m in r if m != "rgb" and "rgb" in r):
            pair = pair_rows("transparency: small64", r[mode], r["rgb"], mode)
            print(f"  {mode} / rgb: " + ", ".join(f"{p['metric'].split(', ')[0]} {p['ratio'] or 0:.2f}" for p in pair))
            rows += pair if name == "own judges" else []  # the shared judge's pair is not a fair one
    print("  wall time, s: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.timings.items()))
    write_record("alpha_small64", {"train_steps": args.train_steps, "timings_s": stages.timings, "eval": results},
                 rows, about="`small64` on the RGBA table (ours) and on the white RGB one with `vae.channels=3` "
                 "(peer), each scored by its own run's judge.")


if __name__ == "__main__":
    main()
