"""The fast-path options on a GPU: `train-step-check --preset emoji64` (the seed's 71M UNet, random weights) at
several batches, bf16 with channels-last, eager and torch.compile; training MFU against the measured bf16 matmul
peak, and the sampler's images/s (fp32 eager vs bf16 + compile). One process, no Ray: it runs on the lent GPU
machine beside `make gpu-check`, with the same wheels (`make gpu-check-wheels`).

    # there:  python3 bench/gpu_fast_path.py --run --out $OUT/fast-path.jsonl [--batches 128,512,1024]
    # here:   .venv/bin/python bench/gpu_fast_path.py --record fast-path.jsonl --commit C --device "one H100 ..."

Goal (bench/HISTORY.md, "GPU fast path"): training MFU at least 30% at the best batch; the sampler at bf16 +
compile at least 3x fp32 eager at batch 16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(out: Path, batches: list[int], steps: int) -> None:
    sys.path.insert(0, str(REPO))
    from emoji_ldm.train.check import StepCheckConfig, step_check
    from emoji_ldm.train.speed import SpeedOptions

    variants = [dict(batch=b, compile=c, sample_batch=0) for b in batches for c in (False, True)]
    variants += [dict(batch=16, compile=False, precision="no", channels_last=False, sample_batch=16, steps=1),
                 dict(batch=16, compile=True, sample_batch=16, steps=1)]
    with open(out, "w") as f:
        for v in variants:
            speed = SpeedOptions(precision=v.get("precision", "bf16"), channels_last=v.get("channels_last", True),
                                 compile=v["compile"])
            config = StepCheckConfig(preset="emoji64", use_gpu=True, steps=v.get("steps", steps), warmup=3,
                                     batch_size=v["batch"], sample_batch=v["sample_batch"], speed=speed)
            try:
                r = step_check(config)
                line = {**v, "speed": r["speed"], "images_per_s": r["images_per_s"], "mfu": r["mfu"],
                        "step_ms": 1000 * r["step_s"], "peak_tflops": r["peak_flops"] / 1e12,
                        "peak_memory_gib": r["peak_memory_bytes"] / 2**30, "device": r["device"],
                        "sampling": r["sampling"]}
            except Exception as e:  # noqa: BLE001 - one variant failing (out of memory) does not stop the others
                line = {**v, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(json.dumps(line), flush=True)
            f.write(json.dumps(line) + "\n")


def record(path: Path, commit: str, device: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import row, write_record

    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    train = [x for x in lines if not x["sample_batch"] and "error" not in x]
    summary = []
    for compiled in (False, True):  # the best batch of each; every variant is in the record's figures
        runs = [x for x in train if x["compile"] == compiled]
        if runs:
            best = max(runs, key=lambda x: x["mfu"])
            summary.append(row("gpu_check: fast path", f"training, bf16 channels-last{' + compile' if compiled else ''}"
                               f": best MFU vs the measured bf16 matmul peak, of batches "
                               f"{', '.join(str(x['batch']) for x in runs)} (batch {best['batch']}, "
                               f"{best['images_per_s']:.0f} images/s)", 100 * best["mfu"], unit="%", goal=">= 30"))
    sampler = {x["compile"]: x["sampling"] for x in lines if x["sample_batch"] and x.get("sampling")}
    if len(sampler) == 2:
        summary.append(row("gpu_check: fast path", "sampling, batch 16: bf16 + compile vs fp32 eager, images/s",
                           sampler[True]["images_per_s"], sampler[False]["images_per_s"], unit="images/s",
                           goal=">= 3"))
    for x in lines:
        if "error" in x:
            print(f"variant failed: {x}", file=sys.stderr)
    write_record("gpu_fast_path", {"variants": lines}, summary, commit=commit,
                 about=f"`train-step-check --preset emoji64` (random weights) on {device}, in one process without "
                       "Ray; 10 timed steps after 3 warm-up steps (compile in the warm-up)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="measure here (a CUDA GPU)")
    parser.add_argument("--out", default="fast-path.jsonl")
    parser.add_argument("--batches", default="128,512,1024")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--record", help="a --run's JSON lines: write the bench record")
    parser.add_argument("--commit", default="")
    parser.add_argument("--device", default="one GPU")
    args = parser.parse_args()
    if args.run:
        run(Path(args.out), [int(b) for b in args.batches.split(",")], args.steps)
    elif args.record:
        record(Path(args.record), args.commit, args.device)
    else:
        parser.error("--run or --record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
