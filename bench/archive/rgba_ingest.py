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
import sys
import tempfile
from pathlib import Path

from common import repeat, row, run_timed, write_record
from ingest import start_ray_head, stop_ray_head  # bench/ingest.py: a private warm head

BIN = Path(sys.executable).parent


def build(out: Path, head: str, limit: int | None, rgb: bool) -> tuple[float, int]:
    cmd = [str(BIN / "emoji-ldm"), "dataset", "build", "--source", "twemoji", "--out", str(out)]
    cmd += ["--limit", str(limit)] if limit else []
    cmd += ["--background", "white"] if rgb else []
    wall, r = run_timed(cmd, env={**os.environ, "RAY_ADDRESS": head})
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
        runs = repeat({mode: lambda i, mode=mode: build(work / f"{mode}-{i}", head, args.limit, rgb=mode == "rgb")
                       for mode in ("rgba", "rgb")}, args.repeat, alternate=True, report=lambda i, mode, r: print(
            f"  run {i + 1} {mode}: {r[1]} images in {r[0]:.1f} s ({r[1] / r[0]:.0f} images/s)", flush=True))
        rate = {mode: [n / wall for wall, n in r] for mode, r in runs.items()}
        rgba, rgb = statistics.median(rate["rgba"]), statistics.median(rate["rgb"])
        print(f"rgba_ingest: {runs['rgba'][0][1]} Twemoji, median of {args.repeat}: RGBA {rgba:.0f} images/s, RGB "
              f"{rgb:.0f} images/s; RGBA / RGB {rgba / rgb:.2f}")
        write_record("rgba_ingest", {"runs": runs}, [row(
            "transparency: ingest", "images/s, RGBA kept (ours) vs RGB (`--background white`)", rate["rgba"],
            rate["rgb"], "images/s", ">= 0.9")], about="`dataset build --source twemoji` on one warm Ray head, RGBA "
            "and RGB alternating.")
    finally:
        stop_ray_head(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
