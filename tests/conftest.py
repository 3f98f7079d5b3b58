"""Shared fixtures: one Ray cluster and one S3 server for the whole session, the tiny pipeline run once,
a local HTTP site. They live in tests/fixtures/ (services.py: the session's S3 server and Ray head, `ray_local`,
`s3_server`; s3.py, ray_nodes.py: servers and nodes a test starts itself; servers.py: the HTTP site, Chromium;
cli.py: `run_cli`, `cli_in_process`; pipeline.py: the tiny pipeline; images.py), registered below; this file sets
the environment every process of the suite inherits and splits the suite between pytest-xdist's workers.

The S3 server is what `infra/local_s3.sh` starts (a moto_server process, the emoji-ldm bucket made as
the minio-bucket Job makes it); the cluster is a head as `infra/local_ray_head.sh` starts it (`ray
start --head`, its dashboard and Jobs API, here 2 CPUs and no log monitor), with that server's variables.
Both start the first time a test needs them and stop at the end of the session. In-process tests join the
cluster as a driver (`ray_local`), CLI subprocesses through RAY_ADDRESS (`run_cli`), the RayJob tests
through its Jobs API. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os

import pytest

from tests.fixtures.cli import run_cli  # noqa: F401  (the helpers tests import from here)
from tests.fixtures.images import make_bad_corpus, png_bytes  # noqa: F401
from tests.fixtures.pipeline import FAST, Pipeline, pipeline_speed, train_fast  # noqa: F401
from tests.fixtures.processes import REPO, VENV_BIN, free_port  # noqa: F401
from tests.fixtures.ray_nodes import start_ray_node_up, stop_ray_nodes  # noqa: F401
from tests.fixtures.s3 import S3Server, start_moto, stop_moto  # noqa: F401
from tests.fixtures.servers import new_chrome  # noqa: F401
from tests.fixtures.services import Cluster, connect, shared_cluster  # noqa: F401

pytest_plugins = ["tests.fixtures.services", "tests.fixtures.servers", "tests.fixtures.cli", "tests.fixtures.pipeline"]

# The virtualenv's programs first, for this process and all it starts (Ray nodes, CLI runs), as `source
# .venv/bin/activate` would: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH, and the
# venv's (1.13) and Debian's (1.11) hash the build log differently, so a suite that mixed them rebuilt the op
# (about a minute each time) whenever the other one ran.
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

os.environ.setdefault("RAY_ACCEPT_LOCAL_EXECUTION_WARNINGS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller polls its workers every 2 s by default, so every run (and every restart after a failure)
# ended 3-4 s after its workers had; at 0.25 s it ends within half a second. About 20 runs in the suite. Ray Train
# passes the variable from the driver (this process, the CLI runs, the Ray head's job drivers) to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts a PreemptionWatcher actor (a Python process of its own, polling the nodes' drain state every 5 s)
# for every run and keeps it across restarts: about 2 CPU seconds a run, for a preemption that a local cluster never
# has (no test drains a node; the project does nothing of its own on preemption). Propagated as the one above.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A raylet keeps as many idle workers as its node has CPUs (2 here) and kills the rest a second after they go idle.
# The suite's stages run one after another in the same few jobs, each with more tasks and actors than that, so
# every stage started its workers again: test_dataset_local.py and test_bulk.py started 72 workers, now 22
# (150 s -> 98 s, 222 -> 128 CPU s on 2 cores, twice each). Every Ray the tests start (the head, the second node,
# a CLI run's own) reads it from this environment.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
# torch's OpenMP threads (libgomp) spin for a while after each parallel op before they sleep. Each process here
# has as many threads as the machine has cores, and two xdist workers, Ray's actors and CLI runs share the two
# cores: the spinning took CPU that another process needed. Passive waiting: the in-process torch tests use 0.79x
# the CPU seconds (bench/omp_wait.py). Every process the tests start inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray's usage stats: the heads are started without them (`--disable-usage-stats`), but each driver (this process,
# a CLI run) that ran Ray Data made a detached usage-collection actor and sent it every execution.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's metrics (each worker records and exports them; each node's agent gathers them and every 5 s reports the
# node's processes to the dashboard): for Prometheus and the dashboard's charts, which no test reads.
os.environ.setdefault("RAY_enable_metrics_collection", "0")
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")


def pytest_collection_modifyitems(items):
    """Every integration test is slow (Ray, servers, a browser); `make test-fast` runs the rest."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


# Integration tests that start no Ray (gpu_check/run.py runs in one process without it; the artifact cache's
# processes read S3, and each xdist worker has an S3 server of its own): they may run beside the rest, as the
# unit tests do.
NO_SHARED_SERVICES = ("tests/integration/test_gpu_check.py", "tests/integration/test_artifact_cache.py")


# The modules that start from the session's tiny pipeline (the `pipeline` fixture): one unit of work, so that one
# worker makes it once. A module missing here still passes; it costs a second pipeline in the other worker.
# DreamBooth (its own models), the training error boundary, captioning, bulk generation and the dataset failure and
# local-Ray modules (their own runs) go with them, so that the two units take about as long (each about 2,000 s of
# test time in `make test`, measured with --durations=0).
PIPELINE_MODULES = tuple(f"tests/integration/test_{m}.py" for m in ("harness", "lineage", "train_loop", "training",
                                                                    "two_node", "dreambooth", "error_boundary",
                                                                    "caption", "eval", "bulk", "dataset_failures",
                                                                    "local_ray", "sources"))


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers (`-n 2`), and the integration tests are two units of work of
    about equal length, one per worker: the modules that share the session's tiny pipeline (and DreamBooth), and
    the rest. Each unit runs in order, with its worker's own Ray head and S3 server (`_Session`): a cluster runs
    one Serve, and each module leaves its cluster idle for the next. The unit tests (they start no Ray and no server:
    tests/unit/conftest.py refuses it) fill in wherever a worker is free. xdist's own `--dist loadgroup` cannot
    group tests under pytest 9.2: it renames items through `Item._nodeid`, which pytest no longer reads."""
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationInTwoUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(PIPELINE_MODULES):
                return "integration: the pipeline's modules and those that go with them"
            if nodeid.startswith("tests/integration/") and not nodeid.startswith(NO_SHARED_SERVICES):
                return "integration: the rest"
            return nodeid

    return IntegrationInTwoUnits(config, log)
