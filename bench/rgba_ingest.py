"""RGBA ingest against the RGB path: `dataset build --source twemoji` (the 4,009 Twemoji PNGs, 64 px), both
ways in one run, on one warm Ray head, alternating so that both see the same machine.

  1. ours:  the default, RGBA kept (premultiplied resize, alpha in the hash);
  2. peer:  `--background white`, the RGB path every table was built with before RGBA.

Wall time of each build process (the Ray head is warm; the process start and Ray connect are in both).
Prints images/s for each and RGBA / RGB; issue 25 asks for at least 0.9.

    .venv/bin/python bench/rgba_ingest.py [--repeat 3] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "bench"))

from ingest import start_ray_head, stop_ray_head  # noqa: E402  (bench/ingest.py: a private warm head)


def build(out: Path, head: str, limit: int | None, rgb: bool) -> tuple[float, int]:
    cmd = [str(BIN / "emoji-ldm"), "dataset", "build", "--source", "twemoji", "--out", str(out)]
    cmd += ["--limit", str(limit)] if limit else []
    cmd += ["--background", "white"] if rgb else []
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": head})
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"build failed ({r.returncode}):\n{r.stderr[-3000:]}")
    images = int(re.search(r"build: (\d+) in", r.stdout + r.stderr).group(1))
    return wall, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-rgba-"))
    head, proc = start_ray_head(work / "ray")
    try:
        build(work / "warm", head, 64, rgb=False)  # workers and imports warm
        times: dict[str, list[float]] = {"rgba": [], "rgb": []}
        images = 0
        for i in range(args.repeat):
            for mode in ("rgba", "rgb") if i % 2 == 0 else ("rgb", "rgba"):
                wall, images = build(work / f"{mode}-{i}", head, args.limit, rgb=mode == "rgb")
                times[mode].append(wall)
                print(f"  run {i + 1} {mode}: {images} images in {wall:.1f} s ({images / wall:.0f} images/s)",
                      flush=True)
        rgba, rgb = statistics.median(times["rgba"]), statistics.median(times["rgb"])
        print(f"rgba_ingest: {images} Twemoji, median of {args.repeat}: RGBA {images / rgba:.0f} images/s "
              f"({rgba:.1f} s), RGB {images / rgb:.0f} images/s ({rgb:.1f} s); RGBA / RGB {rgb / rgba:.2f}")
    finally:
        stop_ray_head(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
