"""CPU seconds per test, for the whole process tree (Ray's workers, CLI subprocesses, Chromium): a pytest plugin
that reads its cgroup v1 `cpuacct.usage` before and after each test. CPU time does not change with the machine's
load the way wall time does, so it ranks what the suite spends while other work runs beside it.

    mkdir -p /sys/fs/cgroup/cpuacct/suite && echo $$ > /sys/fs/cgroup/cpuacct/suite/cgroup.procs
    PYTHONPATH=bench CPU_PER_TEST=/tmp/cpu.jsonl .venv/bin/python -m pytest -p pytest_cpu

Each line of CPU_PER_TEST: {"test", "cpu" (seconds of the whole group during the test, fixtures included),
"wall"}. Without a cpuacct cgroup (cgroup v2, a container without it) the plugin says so and records nothing.
"""

from __future__ import annotations

import json
import os
import time

import pytest


def _usage_file() -> str | None:
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.strip().split(":", 2)
        if "cpuacct" in controllers.split(","):
            usage = f"/sys/fs/cgroup/cpuacct{path}/cpuacct.usage"
            return usage if os.path.exists(usage) else None
    return None


_USAGE = _usage_file()
_OUT = open(os.environ.get("CPU_PER_TEST", "cpu-per-test.jsonl"), "a") if _USAGE else None


def _cpu() -> float:
    with open(_USAGE) as f:
        return int(f.read()) / 1e9


def pytest_report_header(config):
    return f"pytest_cpu: {'CPU per test from ' + _USAGE if _USAGE else 'no cpuacct cgroup: nothing recorded'}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _OUT is None:
        yield
        return
    cpu, wall = _cpu(), time.time()
    yield
    _OUT.write(json.dumps({"test": item.nodeid, "cpu": round(_cpu() - cpu, 2),
                           "wall": round(time.time() - wall, 2)}) + "\n")
    _OUT.flush()
