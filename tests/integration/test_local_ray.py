"""The Ray that a stage starts for itself (no RAY_ADDRESS: a laptop, `make demo`, the scale benchmarks): its
daemons get the settings that keep them flat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from emoji_ldm.runtime.connect import DAEMON_MALLOC_CONF, TASK_EVENTS_ENV, TASK_EVENTS_IN_GCS

# In a process of its own: ensure_ray() starts a local Ray only without RAY_ADDRESS, and the test session's
# process is joined to the session's cluster. It prints each daemon's environment as the daemon sees it.
CHILD = r"""
import json, psutil, ray
from emoji_ldm.runtime.connect import ensure_ray

ensure_ray()
daemons = {p.name(): p.environ() for p in psutil.Process().children(recursive=True)
           if p.name() in ("raylet", "gcs_server")}
print(json.dumps({name: {k: env.get(k) for k in ("MALLOC_CONF", "LD_PRELOAD", "RAY_task_events_max_num_task_in_gcs")}
                  for name, env in daemons.items()}))
ray.shutdown()
"""


# Ray's own processes ask the State API without an address (Ray Train's placement-group cleaner): in a task, the
# nodes it lists, with the machine's "last `ray start` cluster" recorded as another address.
CHILD_STATE = r"""
import ray
from emoji_ldm.runtime.connect import ensure_ray

ensure_ray(dashboard=True)

@ray.remote
def nodes():
    from ray.util.state import list_nodes
    return [n.node_id for n in list_nodes(timeout=20)]

print(ray.get(nodes.remote(), timeout=120) == [ray.get_runtime_context().get_node_id()])
ray.shutdown()
"""


def test_own_ray_answers_its_processes_state_api_calls_with_another_cluster_recorded():
    """A stage's own Ray on a machine whose last `ray start` cluster is another one: the State API that Ray's own
    processes reach without an address is this Ray's (Ray Train's placement-group cleaner otherwise asks the other
    cluster for the run's controller, finds none, and removes the run's placement group)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="emoji-ldm-own-ray-") as tmp:
        env["RAY_TMPDIR"] = tmp
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:  # as `ray start` records a cluster
            f.write("127.0.0.1:9")  # nothing listens there
        r = subprocess.run([sys.executable, "-c", CHILD_STATE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "True", r.stdout[-2000:]


def test_own_ray_runs_its_daemons_without_jemalloc_thread_caches():
    """The raylet and the GCS run on Ray's jemalloc, whose per-thread caches grew an idle raylet 8.8 -> 13.7
    MiB in 14 minutes (build's raylet 1.38x from 100k to 1M rows, a longer run); MALLOC_CONF=tcache:false
    held it at ~8 (bench/raylet_growth.py --compare). The GCS keeps the events of 1,000 tasks."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MALLOC_CONF", TASK_EVENTS_ENV)}
    with tempfile.TemporaryDirectory(prefix="emoji-ldm-own-ray-") as tmp:
        env["RAY_TMPDIR"] = tmp  # never the machine's last `ray start` cluster
        r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    daemons = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(daemons) == {"raylet", "gcs_server"}, daemons
    for name, seen in daemons.items():
        assert "libjemalloc" in (seen["LD_PRELOAD"] or ""), f"{name} does not run on Ray's jemalloc: {seen}"
        assert seen["MALLOC_CONF"] == DAEMON_MALLOC_CONF, f"{name}: {seen}"
    assert daemons["gcs_server"]["RAY_task_events_max_num_task_in_gcs"] == str(TASK_EVENTS_IN_GCS)
