"""Where the suite's CPU goes: CPU seconds per test, for everything the test started (Ray's head and workers, CLI
runs, servers, Chromium), from cgroup v1 `cpuacct`.

A pytest plugin: each xdist worker moves itself into a cpuacct group of its own at start, so the Ray head, Ray
workers, subprocesses and servers it starts are counted in its group and the other worker's are not. CPU time does
not change with the machine's load the way wall time does, so it ranks what a test costs while other work runs
beside it. As root, on a machine with cgroup v1 (this one):

    rm -f /tmp/suite-cpu.jsonl
    SUITE_CPU=/tmp/suite-cpu.jsonl .venv/bin/python -m pytest -n 2 -p bench.suite_cpu
    .venv/bin/python bench/suite_cpu.py /tmp/suite-cpu.jsonl      # per module and per worker, costliest first

A test's figure includes its fixtures' set-up (a module's first test carries the module fixture) and whatever its
worker's background (an idle Ray head, a leftover replica) spent meanwhile. Without a writable cpuacct hierarchy
the plugin says so and records nothing. (`-p bench.suite_cpu`, not `PYTHONPATH=bench`: bench/gpu_check.py would
shadow the gpu_check package that tests/unit/test_gpu_train.py imports.)
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import pytest

ROOT = "/sys/fs/cgroup/cpuacct"
_group: str | None = None


def pytest_configure(config):
    global _group
    name = f"{ROOT}/emoji-ldm-suite-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}"
    try:
        os.makedirs(name, exist_ok=True)
        with open(f"{name}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        _group = name
    except OSError as e:
        print(f"suite_cpu: no cpuacct group ({e}): nothing recorded", file=sys.stderr)


def _cpu() -> float:
    with open(f"{_group}/cpuacct.usage") as f:
        return int(f.read()) / 1e9


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around each test (set-up, call, teardown): appends {test, worker, cpu, wall} to $SUITE_CPU."""
    if _group is None:
        yield
        return
    cpu, wall = _cpu(), time.time()
    yield
    with open(os.environ.get("SUITE_CPU", "suite-cpu.jsonl"), "a") as f:
        f.write(json.dumps({"test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER"),
                            "cpu": round(_cpu() - cpu, 2), "wall": round(time.time() - wall, 2)}) + "\n")


def summarize(path: str, top: int = 40) -> str:
    rows = [json.loads(line) for line in open(path)]
    modules: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0, 0, set()])
    workers: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        m = modules[r["test"].split("::")[0]]
        m[0], m[1], m[2] = m[0] + r["cpu"], m[1] + r["wall"], m[2] + 1
        m[3].add(r["worker"])
        workers[r["worker"]][0] += r["cpu"]
        workers[r["worker"]][1] += r["wall"]
    lines = [f"{len(rows)} tests, {sum(r['cpu'] for r in rows):,.0f} CPU s"]
    lines += [f"  worker {w}: {c:,.0f} CPU s in {t:,.0f} s of tests" for w, (c, t) in sorted(workers.items())]
    lines.append(f"{'CPU s':>8} {'wall s':>8} {'tests':>5}  module (worker)")
    for name, (c, t, n, ws) in sorted(modules.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{c:8.1f} {t:8.1f} {n:5d}  {name} ({','.join(sorted(map(str, ws)))})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
