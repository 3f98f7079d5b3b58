"""How torch's OpenMP threads wait, in the test suite: libgomp's default (spin, then sleep) against passive waiting
(OMP_WAIT_POLICY=PASSIVE, what tests/conftest.py sets), on the suite's in-process torch tests with its two xdist
workers.

    .venv/bin/python bench/omp_wait.py [--repeats 3] [TESTS ...]

Each side runs `pytest -n 2 TESTS` once a round, the order reversed every other round. The figures are the wall
time and the machine's CPU seconds (/proc/stat: every process, the pytest workers and all they start). libgomp's
default is given as OMP_WAIT_POLICY=ACTIVE with GOMP_SPINCOUNT=300000, the spin count libgomp uses when the policy
is unset: tests/conftest.py sets the policy only where it is unset.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import REPO, busy_cpu_s, repeat, row, run_timed, write_record

TESTS = ["tests/unit/test_training_step.py", "tests/unit/test_precision.py", "tests/unit/test_ema_partition.py",
         "tests/unit/test_animation.py", "tests/unit/test_ingress_animation.py", "tests/unit/test_job_animation.py"]
SIDES = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"},
         "libgomp default": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}}


def run_side(env: dict, tests: list[str]) -> dict:
    cpu = busy_cpu_s()
    wall, _ = run_timed([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", *tests],
                        cwd=REPO, env={**os.environ, **env})
    return {"wall_s": round(wall, 2), "cpu_s": round(busy_cpu_s() - cpu, 1), "load_1min": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("tests", nargs="*", default=TESTS)
    args = parser.parse_args()

    def report(i, side, figures):
        print(f"round {i + 1} {side}: {figures['wall_s']:.1f} s wall, {figures['cpu_s']:.0f} CPU s", flush=True)

    runs = repeat({side: (lambda i, env=env: run_side(env, args.tests)) for side, env in SIDES.items()},
                  args.repeats, alternate=True, report=report)
    ours, peer = runs["passive"], runs["libgomp default"]
    summary = [
        row("make: OpenMP waiting", "the suite's in-process torch tests (-n 2): CPU seconds, passive vs libgomp's "
            "default", [r["cpu_s"] for r in ours], [r["cpu_s"] for r in peer], unit="s"),
        row("make: OpenMP waiting", "the same: wall time", [r["wall_s"] for r in ours], [r["wall_s"] for r in peer],
            unit="s"),
    ]
    write_record("omp_wait", {"tests": args.tests, "sides": SIDES, "runs": runs}, summary,
                 about="the suite's torch tests with OpenMP threads waiting passively vs libgomp's default spin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
