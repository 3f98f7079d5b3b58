"""The raylet's private memory against the work a node has done: which kind of work makes it grow.

Issue 28: build's raylet grew from ~13 to ~17 MiB private from 100k to 500k rows (1.27x), though it granted
only ~80 worker leases and saw ~120 plasma objects in the 500k build (its debug_state.txt). This runs each kind
of work in waves on a fresh local Ray (2 CPUs, no dashboard) and reads the raylet's private memory (RSS less
shared pages, bench/common.py: its anonymous heap) after each wave:

  tasks    WAVE no-op tasks
  objects  WAVE tasks returning a 256 KiB array (plasma), consumed 10 at a time by WAVE/10 tasks
  stream   WAVE/10 streaming-generator tasks yielding 10 x 64 KiB arrays each (how Ray Data's map tasks return)
  data     one Ray Data pipeline per wave: range(WAVE x 10 rows, WAVE/10 blocks) -> map_batches -> iter_batches
  idle     nothing for 60 s a wave (Ray's own periodic work: the dashboard agent's polls, resource reports)

    .venv/bin/python bench/raylet_growth.py [--waves 6] [--wave 5000] [--kinds tasks,objects,stream,data]
        [--malloc-conf dirty_decay_ms:0,muzzy_decay_ms:0]   # jemalloc options for the raylet (see below)
        [--env RAY_enable_metrics_collection=0 ...]        # environment of the Ray under test (Ray's system
                                                             # config is RAY_<option>=<value>)
        [--compare tcache:false]   # each kind twice, on Ray's default and with MALLOC_CONF=<this> (what
                                   # emoji_ldm.runtime.connect.DAEMON_MALLOC_CONF is), with each wave's seconds

The raylet and the GCS are C++ daemons that Ray runs on its own jemalloc (LD_PRELOAD of ray/core/libjemalloc.so);
jemalloc reads its options from MALLOC_CONF. Python workers run on glibc, which ignores it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from common import REPO, row, write_record

CHILD = r"""
import sys, time
import numpy as np, psutil, ray

kind, waves, wave, tmp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, sys.argv[5])  # bench/
from common import private_mib, timed
ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp)
raylet = next(p for p in psutil.Process().children(recursive=True) if p.name() == "raylet")

@ray.remote
def noop(i):
    return i


@ray.remote
def array(i):
    return np.zeros(256 * 1024, dtype=np.uint8)


@ray.remote
def consume(*arrays):
    return len(arrays)


@ray.remote(num_returns="streaming")
def stream(i):
    for _ in range(10):
        yield np.zeros(64 * 1024, dtype=np.uint8)


def one_wave():
    if kind == "tasks":
        ray.get([noop.remote(i) for i in range(wave)])
    elif kind == "objects":
        refs = [array.remote(i) for i in range(wave)]
        ray.get([consume.remote(*refs[j:j + 10]) for j in range(0, wave, 10)])
    elif kind == "stream":
        for gen in [stream.remote(i) for i in range(wave // 10)]:
            ray.get(list(gen))
    elif kind == "idle":
        time.sleep(60)
    elif kind == "data":
        ds = ray.data.range(wave * 10, override_num_blocks=wave // 10).map_batches(lambda b: {"x": b["id"] * 2})
        for _ in ds.iter_batches(batch_size=4096):
            pass


print(0, round(private_mib(raylet), 1), 0.0, flush=True)
for w in range(1, waves + 1):
    seconds, _ = timed(one_wave)
    time.sleep(2)
    print(w, round(private_mib(raylet), 1), round(seconds, 2), flush=True)
ray.shutdown()
"""


def run(kind: str, waves: int, wave: int, malloc_conf: str | None,
        extra_env: dict[str, str]) -> list[tuple[float, float]]:
    """(raylet private MiB, the wave's seconds) at the start and after each wave."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.update(extra_env)
    if malloc_conf:
        env.update(RAY_JEMALLOC_PROFILE="raylet", RAY_JEMALLOC_CONF=malloc_conf)
    with tempfile.TemporaryDirectory(prefix="emoji-ldm-raylet-") as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, kind, str(waves), str(wave), tmp, str(REPO / "bench")],
                             env=env, capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    return [(float(r[1]), float(r[2])) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waves", type=int, default=6)
    parser.add_argument("--wave", type=int, default=5000, help="tasks a wave (data: WAVE/10 blocks)")
    parser.add_argument("--kinds", default="tasks,objects,stream,data,idle")
    parser.add_argument("--malloc-conf", default=None, help="jemalloc options through Ray's profiling variables")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--compare", default=None, metavar="MALLOC_CONF",
                        help="run each kind on Ray's default and with MALLOC_CONF=<this>")
    args = parser.parse_args()
    if bad := [e for e in args.env if "=" not in e]:
        parser.error(f"--env takes KEY=VALUE, got {bad[0]!r}")
    extra_env = dict(e.split("=", 1) for e in args.env)
    settings = ({"Ray default": extra_env, f"MALLOC_CONF={args.compare}": {**extra_env, "MALLOC_CONF": args.compare}}
                if args.compare else {"": extra_env})
    print(f"raylet private memory (MiB) after each wave of {args.wave:,}; "
          f"jemalloc conf: {args.malloc_conf or 'Ray default'}; environment: {extra_env or 'Ray default'}")
    print(f"{'kind':<8} " + " ".join(f"{w:>6}" for w in range(args.waves + 1)) + "   wave 1 -> last   waves' s")
    figures, summary = {}, []
    for kind in args.kinds.split(","):
        last = {}
        for label, env in settings.items():
            figures[f"{kind} {label}".strip()] = rows = run(kind, args.waves, args.wave, args.malloc_conf, env)
            mib, seconds = [m for m, _ in rows], sum(s for _, s in rows)
            last[label] = (mib[-1], seconds)
            print(f"{kind:<8} " + " ".join(f"{m:>6.1f}" for m in mib) + f"   {mib[-1] / mib[1]:>5.2f}x"
                  f"   {seconds:>8.1f}   {label}", flush=True)
        if args.compare:
            (m0, s0), (m1, s1) = last.values()
            print(f"{'':<8} with MALLOC_CONF against Ray's default: last wave's memory {m1 / m0:.2f}x, "
                  f"waves' time {s1 / s0:.2f}x", flush=True)
            summary += [row("ray_daemons", f"raylet {what} after {args.waves} waves of `{kind}`: `{args.compare}` vs "
                            "Ray's default", mine, ray, unit) for what, mine, ray, unit in
                        (("private memory", m1, m0, "MiB"), ("seconds", s1, s0, "s"))]
    write_record("raylet_growth", {"wave": args.wave, "malloc_conf": args.malloc_conf, "env": extra_env,
                                   "private_mib_and_s": figures}, summary, about="a fresh local Ray per kind of work.")


if __name__ == "__main__":
    main()
