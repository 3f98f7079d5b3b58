"""What a Ray head's own daemons cost the test suite: the head as tests/conftest.py starts it (no log monitor; the
drivers without Ray's usage stats) against the head as infra/local_ray_head.sh starts it (Ray's defaults).

    .venv/bin/python bench/suite_ray_head.py [--repeats 3] [--actors 24] [--idle 20]

Each round starts a head on each side (`ray start --head --block`, 2 CPUs, its dashboard, its own RAY_TMPDIR), runs
the same driver against it (pairs of short-lived actors, as a Ray Train run starts them and each leaves its worker
log files, then Ray Data executions), lets it idle, and stops it; the order is reversed every other round. The
figures: the machine's CPU seconds over the round (/proc/stat, every process), and the CPU seconds of the log monitor
and of Ray Data's usage-collection actor (the detached actor a driver makes when usage stats are on).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
from common import REPO, busy_cpu_s, free_port, repeat, row, write_record

VENV_BIN = REPO / ".venv" / "bin"
SIDES = {"suite's head": {"args": ["--include-log-monitor", "false"], "driver_env": {"RAY_USAGE_STATS_ENABLED": "0"}},
         "Ray's defaults": {"args": [], "driver_env": {}}}
DRIVER = """
import sys, ray
ray.init(configure_logging=False, log_to_driver=False)

@ray.remote(num_cpus=1)
class Worker:
    def ping(self):
        return 1

for _ in range(int(sys.argv[1]) // 2):  # two at a time, as a 2-worker Ray Train run holds them
    pair = [Worker.remote() for _ in range(2)]
    ray.get([w.ping.remote() for w in pair])
    for w in pair:
        ray.kill(w)
for _ in range(8):
    ray.data.range(2000, override_num_blocks=4).map_batches(lambda b: b).materialize()
"""


def daemon_cpu_s(temp: str) -> dict:
    """CPU seconds so far of the head's log monitor and of its usage-collection actor (a worker of its raylet; 0
    where there is none)."""
    out = {"log_monitor_cpu_s": 0.0, "usage_actor_cpu_s": 0.0}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            key = ("log_monitor_cpu_s" if "log_monitor.py" in cmd and temp in cmd else
                   "usage_actor_cpu_s" if cmd.startswith("ray::_UsageCollectionActor")
                   and temp in " ".join(p.parent().cmdline()) else None)
            if key:
                out[key] += sum(p.cpu_times()[:2])
        except (psutil.Error, AttributeError):  # gone, or no parent
            pass
    return out


def run_side(side: dict, actors: int, idle: float) -> dict:
    temp = tempfile.mkdtemp(prefix="rayd-", dir="/tmp")
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_num_workers_soft_limit": "8", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("RAY_ADDRESS", None)
    cpu, start = busy_cpu_s(), time.time()
    head = subprocess.Popen([VENV_BIN / "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard",
                             "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
                             "--dashboard-agent-listen-port", str(free_port()), *side["args"]],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        driver_env = {k: v for k, v in os.environ.items() if k != "RAY_USAGE_STATS_ENABLED"}
        driver_env.update(RAY_ADDRESS=f"127.0.0.1:{port}", RAY_AUTH_MODE="disabled", **side["driver_env"])
        for _ in range(60):  # the head takes a few seconds to listen
            done = subprocess.run([sys.executable, "-c", DRIVER, str(actors)], env=driver_env, capture_output=True,
                                  text=True)
            if done.returncode == 0 or "Could not find any running Ray instance" not in done.stderr:
                break
            time.sleep(1)
        if done.returncode:
            raise SystemExit(f"the driver failed:\n{done.stderr[-3000:]}")
        time.sleep(idle)
        figures = daemon_cpu_s(temp)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)
        shutil.rmtree(temp, ignore_errors=True)
    return {"wall_s": round(time.time() - start, 1), "cpu_s": round(busy_cpu_s() - cpu, 1),
            **{k: round(v, 2) for k, v in figures.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--actors", type=int, default=24, help="short-lived actors, started two at a time")
    parser.add_argument("--idle", type=float, default=20, help="seconds the head idles after the driver")
    args = parser.parse_args()

    def report(i, name, f):
        print(f"round {i + 1} {name}: {f['cpu_s']:.0f} CPU s in {f['wall_s']:.0f} s; log monitor "
              f"{f['log_monitor_cpu_s']:.1f}, usage actor {f['usage_actor_cpu_s']:.1f} CPU s", flush=True)

    runs = repeat({name: (lambda i, s=side: run_side(s, args.actors, args.idle)) for name, side in SIDES.items()},
                  args.repeats, alternate=True, report=report)
    ours, peer = runs["suite's head"], runs["Ray's defaults"]
    area = "make: the suite's Ray head"
    summary = [
        row(area, f"a head through {args.actors} actors, 8 Ray Data runs and {args.idle:g} s idle: the machine's "
            "CPU seconds, the suite's head vs Ray's defaults", [r["cpu_s"] for r in ours], [r["cpu_s"] for r in peer],
            unit="s"),
        row(area, "the same: the log monitor's and the usage actor's CPU seconds",
            [r["log_monitor_cpu_s"] + r["usage_actor_cpu_s"] for r in ours],
            [r["log_monitor_cpu_s"] + r["usage_actor_cpu_s"] for r in peer], unit="s"),
    ]
    figures = {"sides": SIDES, "actors": args.actors, "idle_s": args.idle, "runs": runs}
    write_record("suite_ray_head", figures, summary,
                 about="a Ray head as the suite starts it (no log monitor, no usage stats) vs Ray's defaults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
