"""The GCS's memory against the tasks a cluster has run: Ray's default task-event store against ours.

The GCS records every task's events for the dashboard and `ray list tasks`
(up to RAY_task_events_max_num_task_in_gcs tasks, 100,000 by default), so its
memory grows with the tasks a stage runs: with the rows. `emoji_ldm.runtime`
keeps 1,000 (TASK_EVENTS_IN_GCS; 5,000 before 2026-11-25), as the k8s/ heads do. For each setting one
fresh local Ray (its own process, the setting in its environment as on a
KubeRay head) runs waves of 10,000 no-op tasks, and the GCS's private memory
(RSS less shared pages, bench/common.py) is read after each wave.

    .venv/bin/python bench/gcs_events.py [--tasks 60000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from common import REPO, human, row, write_record

from emoji_ldm.runtime.connect import TASK_EVENTS_ENV, TASK_EVENTS_IN_GCS

WAVE = 10_000

CHILD = r"""
import sys, time, psutil, ray
sys.path.insert(0, sys.argv[3])  # bench/
from common import private_mib
ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[2])
gcs = next(p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server")
@ray.remote
def noop(i):
    return i
print(0, round(private_mib(gcs), 1), flush=True)
for done in range(WAVE, int(sys.argv[1]) + 1, WAVE):
    ray.get([noop.remote(i) for i in range(WAVE)])
    time.sleep(2)  # the workers flush their task events to the GCS every second
    print(done, round(private_mib(gcs), 1), flush=True)
ray.shutdown()
""".replace("WAVE", str(WAVE))


def run(tasks: int, cap: int | None) -> list[tuple[int, float]]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TASK_EVENTS_ENV)}
    if cap is not None:
        env[TASK_EVENTS_ENV] = str(cap)
    with tempfile.TemporaryDirectory(prefix="emoji-ldm-gcs-") as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(tasks), tmp, str(REPO / "bench")], env=env,
                             capture_output=True, text=True, check=True).stdout
    return [(int(a), float(b)) for a, b in (line.split() for line in out.splitlines() if line.strip())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=60_000)
    args = parser.parse_args()
    peer, ours = run(args.tasks, None), run(args.tasks, TASK_EVENTS_IN_GCS)
    print(f"GCS private memory (MiB) after N no-op tasks; peer: Ray's default ({TASK_EVENTS_ENV} unset, 100,000), "
          f"ours: {TASK_EVENTS_IN_GCS:,}")
    print(f"{'tasks':>8} {'peer':>8} {'ours':>8} {'ours/peer':>10}")
    for (n, p), (_, o) in zip(peer, ours):
        print(f"{n:>8,} {p:>8.1f} {o:>8.1f} {o / p:>9.2f}x")
    first = 1  # after the first wave: Ray's start is behind both
    print(f"growth from {peer[first][0]:,} to {peer[-1][0]:,} tasks: peer {peer[-1][1] / peer[first][1]:.2f}x, "
          f"ours {ours[-1][1] / ours[first][1]:.2f}x")
    write_record("gcs_events", {"cap": TASK_EVENTS_IN_GCS, "peer_mib": peer, "ours_mib": ours}, [row(
        "ray_daemons", f"GCS private MiB after {ours[-1][0]:,} tasks: events capped at {TASK_EVENTS_IN_GCS:,} vs Ray's "
        "default", ours[-1][1], peer[-1][1], "MiB"), row("ray_daemons", f"GCS private MiB, capped, {human(ours[-1][0])}"
        f" / {human(ours[first][0])} tasks", ours[-1][1], ours[first][1], "MiB", "<= 1.25")])


if __name__ == "__main__":
    main()
