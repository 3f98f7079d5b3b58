"""`make test` and `make demo` on a fresh clone: wall time, as CI and a new user run them.

    .venv/bin/python bench/make_times.py --target test     # clone HEAD into a temporary folder, CI=true make test
    .venv/bin/python bench/make_times.py --target demo
    .venv/bin/python bench/make_times.py --target demo --from-log LOG --note "..."   # record a run already made

The clone builds its own .venv (`make install`; pip's cache makes that about 2 minutes here, more on a machine
without one). The record has the whole `make` wall time, pytest's own time (its last line), the passed and failed
counts and, for the demo, its per-step timings (infra/demo.sh prints them). Run it with nothing else on the
machine: the figure is the point.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, row, write_record

GOAL_MIN = {"test": 20, "demo": 15}


def parse(target: str, log: str) -> dict:
    figures: dict = {}
    if target == "test":
        for line in reversed(log.splitlines()):
            m = re.search(r"=+ (.*) in ([0-9.]+)s", line)
            if m:
                counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", m[1]))
                figures.update(pytest_wall_s=float(m[2]), **counts)
                break
        figures["slowest"] = re.findall(r"^([0-9.]+)s (call|setup|teardown)\s+(\S+)$", log, re.M)[:30]
    else:
        steps = re.findall(r"^([a-z-]+)\s+([0-9.]+) s$", log, re.M)
        figures["steps_s"] = {name: float(s) for name, s in steps}
        total = re.search(r"^total\s+([0-9.]+) s", log, re.M)
        figures["demo_total_s"] = float(total[1]) if total else None
        # eval's summary line: prompt accuracy (no flags) with its interval, the real images and the baselines
        acc = re.search(r"prompt accuracy \(no flags\) ([0-9.]+)% \[([0-9.]+), ([0-9.]+)\] = [0-9.]+x real images "
                        r"\(([0-9.]+)%\), empty prompt ([0-9.]+)%, caption retrieval ([0-9.]+)% \((\d+) captions\)",
                        log)
        if acc:
            figures["eval"] = dict(zip(("accuracy", "low", "high", "real", "empty", "retrieval"),
                                       map(float, acc.groups()[:6])), captions=int(acc[7]))
    return figures


def run(target: str, keep: bool) -> tuple[float, str, int, str]:
    """(wall s, the log, the exit status, the clone's commit: what ran, whatever this checkout holds besides)."""
    folder = Path(tempfile.mkdtemp(prefix=f"emoji-ldm-make-{target}-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(folder / "repo")], check=True)
    cloned = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder / "repo", capture_output=True,
                            text=True, check=True).stdout.strip()
    start = time.perf_counter()
    proc = subprocess.run(["make", target], cwd=folder / "repo", env={**_env(), "CI": "true"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    (folder / f"make-{target}.log").write_text(proc.stdout)
    print(f"log: {folder / f'make-{target}.log'}")
    if not keep:
        subprocess.run(["rm", "-rf", str(folder / "repo")])
    return wall, proc.stdout, proc.returncode, cloned


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("test", "demo"), required=True)
    parser.add_argument("--from-log", help="record this log of a run already made instead of running one")
    parser.add_argument("--wall-s", type=float, help="with --from-log: the run's whole wall time")
    parser.add_argument("--note", default=None, help="what the machine was doing besides (with --from-log)")
    parser.add_argument("--commit", default=None, help="with --from-log: the commit the run was made at")
    parser.add_argument("--keep", action="store_true", help="keep the clone")
    parser.add_argument("--fresh-clone", action="store_true", help="with --from-log: the log is of a fresh clone")
    args = parser.parse_args()
    extra = {}
    if args.from_log:
        log = Path(args.from_log).read_text()
        said = re.findall(r"^exit (\d+)(?: wall \d+)?$", log, re.M)  # the exit status the log's last line gives, if any
        rc, wall = (int(said[-1]) if said else None), args.wall_s
        if args.commit:
            extra["commit"] = args.commit
    else:
        wall, log, rc, extra["commit"] = run(args.target, args.keep)
    figures = {"make_wall_s": wall, "returncode": rc, **parse(args.target, log)}
    minutes = (wall or figures.get("demo_total_s") or 0) / 60
    where = " on a fresh clone" if args.fresh_clone or not args.from_log else ""
    summary = [row(f"make: {args.target}", f"`make {args.target}` wall time{where}", minutes, unit="min",
                   goal=f"<= {GOAL_MIN[args.target]}", note=args.note)]
    if args.target == "test" and "pytest_wall_s" in figures:
        summary.append(row(f"make: {args.target}", f"its pytest ({figures.get('passed', 0)} passed, "
                           f"{figures.get('failed', 0)} failed)", figures["pytest_wall_s"] / 60, unit="min",
                           goal=f"<= {GOAL_MIN['test']}"))
    if "eval" in figures:
        e = figures["eval"]
        about = (f"{e['captions']} held-out captions x 4 samples, the frozen judge; ours {e['accuracy']}% "
                 f"[{e['low']}, {e['high']}]")
        summary += [row("demo quality", "its eval: prompt accuracy without flags, vs the real held-out images",
                        e["accuracy"], e["real"], unit="%", goal=">= 0.75", note=about),
                    row("demo quality", "the same, vs the empty prompt", e["accuracy"], e["empty"], unit="%"),
                    row("demo quality", "the same, vs caption retrieval (the nearest training caption's image)",
                        e["accuracy"], e["retrieval"], unit="%")]
    write_record(f"make_{args.target}", figures, summary, **extra)
    print(f"make {args.target}: {minutes:.1f} min, rc {rc}")
    return 0 if rc in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
