"""Submitting a stage to a Ray cluster: `emoji-ldm submit` against Ray's own `ray job submit`.

One local Ray head (infra/local_ray_head.sh) and S3 server (infra/local_s3.sh) on this machine; the
same stage (`build --source twemoji --limit N` into S3) three ways, alternating, each from a fresh
process as a user would type it:
  - ours: `emoji-ldm submit build ... --address URL` (checks the flags, uploads the checkout, follows logs);
  - peer: `ray job submit --address URL --working-dir . -- python ray_jobs/build_dataset.py ...`;
  - reference: `emoji-ldm dataset build ...` with no cluster (starts its own local Ray).
Wall time from the command's start to its exit. Prints the medians and peer/ours.

    .venv/bin/python bench/submit.py [--limit 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, free_port, repeat, row, run_timed, write_record

BIN = Path(sys.executable).parent


def helper(script: str, action: str, env: dict) -> None:
    subprocess.run([str(REPO / "infra" / script), action], env=env, check=True, capture_output=True, text=True)


def timed(cmd: list[str], env: dict) -> float:
    return run_timed(cmd, env=env, cwd=REPO)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    dashboard = free_port()
    env = {**os.environ, "EMOJI_LDM_LOCAL": str(state), "S3_PORT": str(free_port()), "RAY_PORT": str(free_port()),
           "DASHBOARD_PORT": str(dashboard), "NUM_CPUS": "2", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    helper("local_s3.sh", "start", env)
    s3 = dict(line.removeprefix("export ").split("=", 1)
              for line in (state / "s3.env").read_text().splitlines() if line.startswith("export "))
    env.update(s3)
    address = f"http://127.0.0.1:{dashboard}"
    stage = ["--source", "twemoji", "--limit", str(args.limit)]
    try:
        helper("local_ray_head.sh", "start", env)
        times = repeat({"ours": lambda i: timed([str(BIN / "emoji-ldm"), "submit", "build", *stage, "--out",
                                                 f"s3://emoji-ldm/bench/ours-{i}", "--address", address], env),
                        "peer": lambda i: timed([str(BIN / "ray"), "job", "submit", "--address", address,
                                                 "--working-dir", ".", "--", "python", "ray_jobs/build_dataset.py",
                                                 *stage, "--out", f"s3://emoji-ldm/bench/peer-{i}"], env)},
                       args.repeat, report=lambda i, who, s: print(f"run {i + 1}: {who} {s:.1f} s", flush=True))
    finally:
        helper("local_ray_head.sh", "stop", env)
    try:  # the same build with no cluster, after the head is gone (it would join it otherwise)
        times["local"] = [timed([str(BIN / "emoji-ldm"), "dataset", "build", *stage, "--out",
                                 f"s3://emoji-ldm/bench/local-{i}"], env) for i in range(args.repeat)]
    finally:
        helper("local_s3.sh", "stop", env)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"build --limit {args.limit} into S3, median of {args.repeat}:")
    print(f"  ours  emoji-ldm submit   {med['ours']:6.1f} s   {[round(t, 1) for t in times['ours']]}")
    print(f"  peer  ray job submit     {med['peer']:6.1f} s   {[round(t, 1) for t in times['peer']]}")
    print(f"  local emoji-ldm dataset build (no cluster) {med['local']:6.1f} s   "
          f"{[round(t, 1) for t in times['local']]}")
    print(f"peer / ours = {med['peer'] / med['ours']:.2f}x; submit overhead over a local run "
          f"{med['ours'] - med['local']:+.1f} s")
    write_record("submit", {"limit": args.limit, "seconds": times}, [
        row("submit", f"wall time: `emoji-ldm submit build` vs {peer}", times["ours"], times[key], "s")
        for key, peer in (("peer", "`ray job submit`"), ("local", "`dataset build` with no cluster"))],
        about=f"`build --source twemoji --limit {args.limit}` into S3 on a local Ray head, ours and the peer "
        "alternating; the local builds after the head is gone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
