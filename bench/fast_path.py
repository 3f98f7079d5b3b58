"""The fast-path options on this CPU, same run: bf16 autocast vs fp32 and compile vs eager (plus channels-last and
gradient checkpointing), for the `tiny` training step and the sampler.

Each variant is one `emoji-ldm train-step-check` (the real training step on a PlainEngine and the real
DPM-Solver++ loop with guidance, random weights) in its own process, so compile caches and peak memory do not
carry over. Prints training images/s, sampler images/s, the first (compiling) step's seconds and peak memory,
and each variant's ratio to fp32 eager. CPU figures say what to turn on where, not what a GPU does
(bench/HISTORY.md "GPU fast path" has the GPU commands).

    python bench/fast_path.py [--preset tiny] [--batch-size 64] [--steps 10] [--sample-batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common import REPO, row, run_timed, write_record

sys.path.insert(0, str(REPO))

VARIANTS = {  # name: SpeedOptions fields
    "fp32 eager": {"precision": "no"},
    "bf16 eager": {"precision": "bf16"},
    "fp32 channels-last": {"precision": "no", "channels_last": True},
    "fp32 grad-checkpointing": {"precision": "no", "gradient_checkpointing": True},
    "fp32 compile": {"precision": "no", "compile": True},
    "bf16 compile": {"precision": "bf16", "compile": True},
}


def one(args: argparse.Namespace, variant: str) -> dict:
    from emoji_ldm.train.check import StepCheckConfig, step_check
    from emoji_ldm.train.speed import SpeedOptions

    config = StepCheckConfig(preset=args.preset, steps=args.steps, warmup=1, batch_size=args.batch_size,
                             speed=SpeedOptions(**VARIANTS[variant]), sample_batch=args.sample_batch,
                             sample_steps=args.sample_steps)
    r = step_check(config)
    return {"variant": variant, "train_images_per_s": r["images_per_s"], "first_step_s": r["warmup_s"],
            "sample_images_per_s": r["sampling"]["images_per_s"], "first_sample_s": r["sampling"]["warmup_s"],
            "peak_rss_mib": r["peak_memory_bytes"] / 2**20, "mfu": r["mfu"], "params_m": r["params"] / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after one untimed)")
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: one variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args, args.one)))
        return

    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    print(f"bench/fast_path.py: preset {args.preset}, {os.cpu_count()} CPUs, training batch {args.batch_size} x "
          f"{args.steps} steps, sampler batch {args.sample_batch} x {args.sample_steps} steps", flush=True)
    done, flags = [], ["--preset", args.preset, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                       "--sample-batch", str(args.sample_batch), "--sample-steps", str(args.sample_steps)]
    for variant in variants:
        seconds, r = run_timed([sys.executable, __file__, *flags, "--one", variant], check=False, cwd=REPO)
        if r.returncode:
            print(f"{variant:24s} failed:\n{r.stderr[-1500:]}", flush=True)
            continue
        done.append(v := {**json.loads(r.stdout.strip().splitlines()[-1]), "process_s": seconds})
        base = done[0]
        print(f"{variant:24s} train {v['train_images_per_s']:7.1f} images/s "
              f"({v['train_images_per_s'] / base['train_images_per_s']:.2f}x), first step "
              f"{v['first_step_s']:6.1f} s | sampler {v['sample_images_per_s']:6.2f} images/s "
              f"({v['sample_images_per_s'] / base['sample_images_per_s']:.2f}x), first call "
              f"{v['first_sample_s']:6.1f} s | peak RSS {v['peak_rss_mib']:5.0f} MiB, MFU {100 * v['mfu']:.1f}%",
              flush=True)
    write_record("fast_path", {"config": flags, "variants": done}, [
        row("fast_path", f"{v['variant']}: {what} images/s vs {done[0]['variant']}", v[key], done[0][key], "images/s")
        for v in done[1:] for what, key in (("training", "train_images_per_s"), ("sampler", "sample_images_per_s"))],
        about=f"each variant one `train-step-check --preset {args.preset}` in its own process.")


if __name__ == "__main__":
    main()
