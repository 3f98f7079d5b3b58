"""`make gpu-check`: the GPU paths of emoji-ldm in one process, one device, a few minutes, no Ray.

Runs on the GPU check machine (one H100/H200, torch, transformers, accelerate, peft, pyarrow and pandas
installed; diffusers, deepspeed and Pillow from `make gpu-check-wheels`), and with `--device cpu` here. Every
check builds tiny random models of the real classes (nothing is downloaded), runs in its own try/except, and
ends `pass`, `fail` (with the error) or `skip` (with the reason: a package that is not installed). The report
is JSON (`--out`, default gpu-check.json) plus a short table; the exit code is 1 when any check failed.

    python gpu_check/run.py --device cuda            # on the GPU machine (about 3 minutes on an H100)
    python gpu_check/run.py --device cpu [--quick]   # here: the same code paths, smaller sizes

Checks: deepspeed-zero2-bf16, deepspeed-zero3-bf16 (DeepSpeed on one rank: steps, the fp32 EMA, a checkpoint and a
resume), train-step-check (MFU), dreambooth-lora, encode, caption-qwen25vl, pixel32 (the demo's pixel model),
sample-{fp16,bf16}[-compile], generator-set, ray-serve.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # emoji_ldm and tests.tiny_models from the working tree (not installed there)

from gpu_check.context import Context, Skip, device_name, versions  # noqa: E402
from gpu_check.inference_checks import caption, compiled, encode, generator_set, ray_serve, sampling  # noqa: E402
from gpu_check.train_checks import deepspeed_check, dreambooth_lora, pixel32, step_check  # noqa: E402


def checks(ctx: Context) -> list[tuple[str, object]]:
    out = [("deepspeed-zero2-bf16", lambda: deepspeed_check(ctx, 2)),
           ("deepspeed-zero3-bf16", lambda: deepspeed_check(ctx, 3)),
           ("train-step-check", lambda: step_check(ctx)),
           ("dreambooth-lora", lambda: dreambooth_lora(ctx)),
           ("encode", lambda: encode(ctx)),
           ("caption-qwen25vl", lambda: caption(ctx)),
           ("pixel32", lambda: pixel32(ctx))]
    for dtype in ("fp16", "bf16"):
        out.append((f"sample-{dtype}", lambda d=dtype: sampling(ctx, d, False)))
    for dtype in ("fp16", "bf16"):
        out.append((f"sample-{dtype}-compile", lambda d=dtype: compiled(ctx, d)))
    out += [("generator-set", lambda: generator_set(ctx)), ("ray-serve", lambda: ray_serve(ctx))]
    return out


def run_check(name: str, fn) -> dict:
    start = time.perf_counter()
    entry: dict = {"name": name}
    try:
        entry["figures"] = fn()
        entry["status"] = "pass"
    except Skip as e:
        entry.update(status="skip", figures={}, reason=str(e))
    except Exception as e:  # one failure must not stop the other checks
        entry.update(status="fail", figures={}, error=f"{type(e).__name__}: {e}"[:2000],
                     traceback=traceback.format_exc()[-4000:])
    entry["seconds"] = round(time.perf_counter() - start, 2)
    gc.collect()
    return entry


def table(report: dict) -> str:
    lines = [f"gpu-check on {report['device']} ({report['date']}), {report['seconds']:.0f} s",
             f"{'check':<24} {'status':<6} {'seconds':>8}  note"]
    for c in report["checks"]:
        f = c.get("figures") or {}
        if c["status"] == "fail":
            note = c["error"].splitlines()[0][:90]
        elif c["status"] == "skip":
            note = c["reason"][:90]
        else:
            keys = ("step_ms", "images_per_s", "mfu_vs_measured", "mfu_vs_datasheet", "loss_after",
                    "ema_moved_max_abs")
            note = ", ".join(f"{k}={f[k]:.3g}" if isinstance(f[k], float) else f"{k}={f[k]}"
                             for k in keys if f.get(k) is not None)
        lines.append(f"{c['name']:<24} {c['status']:<6} {c['seconds']:>8.1f}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes and steps (the suite's test)")
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations in diffusers' and torch's own code
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    import torch

    try:  # the tiny models' loading bars and dtype notes would bury the table
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(args.device, args.quick, work)
    only = {n for n in args.only.split(",") if n}
    results = []
    try:
        for name, fn in checks(ctx):
            if only and name not in only:
                continue
            print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
            results.append(run_check(name, fn))
            print(f"gpu-check: {name}: {results[-1]['status']} ({results[-1]['seconds']} s)", file=sys.stderr,
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    report = {"checks": results, "device": device_name(args.device),
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
              "seconds": round(time.perf_counter() - start, 1), "versions": versions()}
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    print(f"report: {args.out}")
    return 1 if any(c["status"] == "fail" for c in results) else 0


if __name__ == "__main__":
    sys.exit(main())
