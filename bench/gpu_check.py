"""Turn a `make gpu-check` report (gpu_check/run.py's JSON, run on the GPU machine) into a benchmark record.

    .venv/bin/python bench/gpu_check.py gpu-check.json --commit 188311f [--command "python3 gpu_check/run.py ..."]

The GPU machine has no checkout history and no bench/ dependencies, so its report comes back as a file and is
recorded here: bench/results/gpu_check-<the report's date>.json, with the whole report under `figures`, the
device and package versions as the machine, and summary rows for bench/RESULTS.md (checks passed, the
train-step-check MFU, the ZeRO steps, compiled vs eager sampling).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, row  # noqa: E402


def summary(report: dict) -> list[dict]:
    checks = {c["name"]: c for c in report["checks"]}
    figures = {name: c.get("figures") or {} for name, c in checks.items()}
    passed = [n for n, c in checks.items() if c["status"] == "pass"]
    others = ", ".join(f"{n} {c['status']}" for n, c in checks.items() if c["status"] != "pass")
    rows = [row("gpu_check", f"checks passed, of {len(checks)}" + (f" ({others})" if others else ""), len(passed)),
            row("gpu_check", "whole check", report["seconds"], unit="s", goal="<= 480")]
    step = figures.get("train-step-check", {})
    if "mfu_vs_measured" in step:
        speed = f"{step.get('images_per_s', 0):.0f} images/s"
        rows.append(row("gpu_check", f"train-step-check: MFU vs the measured bf16 matmul peak ({speed})",
                        100 * step["mfu_vs_measured"], unit="%"))
    zero2, zero3 = figures.get("deepspeed-zero2-bf16", {}), figures.get("deepspeed-zero3-bf16", {})
    if "step_ms" in zero2 and "step_ms" in zero3:
        resumed = all(z.get("next_loss_original") == z.get("next_loss_resumed") for z in (zero2, zero3))
        rows.append(row("gpu_check", f"ZeRO-2 bf16 step with the EMA, one rank, tiny UNet (ZeRO-3: "
                        f"{zero3['step_ms']:.0f} ms); resumed step equal: {resumed}", zero2["step_ms"], unit="ms"))
    for dtype in ("fp16", "bf16"):
        eager, compiled = figures.get(f"sample-{dtype}", {}), figures.get(f"sample-{dtype}-compile", {})
        if "images_per_s" in eager and "images_per_s" in compiled:
            rows.append(row("gpu_check", f"sampling {dtype}: torch.compile vs eager", compiled["images_per_s"],
                            eager["images_per_s"], unit="images/s"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="gpu_check/run.py's JSON report, as it came back from the GPU machine")
    parser.add_argument("--commit", required=True, help="the commit the GPU machine ran (git rev-parse --short HEAD)")
    parser.add_argument("--command", default="python3 gpu_check/run.py --device cuda",
                        help="the command as run there")
    args = parser.parse_args()
    report = json.loads(Path(args.report).read_text())
    date = dt.datetime.fromisoformat(report["date"].replace("Z", "+00:00"))
    record = {"bench": "gpu_check", "command": args.command.split(), "commit": args.commit,
              "date": date.isoformat(), "seconds": report["seconds"],
              "machine": {"device": report["device"], **report.get("versions", {})},
              "about": f"on one {report['device']} (the lent GPU machine), tiny random models of the real classes; "
                       "no Ray there (ray-serve skipped: its wheel is over what one call carries).",
              "figures": report, "summary": summary(report)}
    path = RESULTS / f"gpu_check-{date:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
