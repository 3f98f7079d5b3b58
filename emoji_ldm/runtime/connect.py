"""Connecting to Ray: a running cluster when RAY_ADDRESS is set, else a local one, with the Data settings and
daemon settings every stage uses."""

from __future__ import annotations

import logging
import os

from emoji_ldm.runtime.partitions import PARTITION_BYTES


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False, private: bool = False) -> None:
    """Start (or join) Ray once per process, quietly.

    `private=True` (`emoji-ldm serve`): a local instance this process starts runs with Ray's token
    authentication (`private_token_auth`), whatever RAY_AUTH_MODE says, and without its dashboard.

    Inside a Ray Job (KubeRay RayJob or `ray job submit`) RAY_ADDRESS points
    at the cluster and we join it; on a laptop we start a local instance.
    `dashboard=True` (the training stages) starts the dashboard too, about 3 s
    more: Ray Train's placement-group cleaner asks the State API, which the
    dashboard serves, and without it warns every few seconds.
    """
    import ray

    if not ray.is_initialized():
        if private and not os.environ.get("RAY_ADDRESS"):
            private_token_auth()
            dashboard = False
        _init(ray, num_cpus, dashboard)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
    # a UserError raised in a map function reaches the driver as itself (the CLI prints it as one line),
    # not as a UserCodeException that keeps only its text
    ctx.raise_original_map_exception = True
    # Parquet through Ray Data's V1 datasource: the V2 one (Ray 2.60's default) holds a whole folder's rows in
    # one read worker (bench/HISTORY.md, "Data stages at scale")
    ctx.use_datasource_v2 = False
    # a shuffle's map task partitions at most this much input at once (Ray's default, 1 GiB, grows the task
    # with the shuffle)
    ctx.shuffle_input_batch_bytes = 4 * PARTITION_BYTES


# The GCS keeps an event record of every task (about 3.5 KB each, up to 100,000 by default), which grows it with
# a stage's length; the last 1,000 are enough to debug a stage (bench/gcs_events.py). Set on every head in k8s/.
TASK_EVENTS_ENV = "RAY_task_events_max_num_task_in_gcs"
TASK_EVENTS_IN_GCS = 1_000

# Ray's daemons run on the jemalloc it ships, which reads MALLOC_CONF: without its per-thread caches an idle
# raylet stays flat instead of growing by the hour (bench/raylet_growth.py --compare). infra/Dockerfile sets it too.
DAEMON_MALLOC_CONF = "tcache:false"


def _init(ray, num_cpus: int | None, dashboard: bool) -> None:
    os.environ.setdefault("RAY_ACCEPT_LOCAL_EXECUTION_WARNINGS", "1")
    os.environ.setdefault(TASK_EVENTS_ENV, str(TASK_EVENTS_IN_GCS))  # read by the GCS this process starts
    os.environ.setdefault("MALLOC_CONF", DAEMON_MALLOC_CONF)  # read by the raylet and GCS it starts
    kwargs = dict(include_dashboard=dashboard, logging_level=logging.WARNING, configure_logging=True)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # "local": always our own instance, never a `ray start` cluster someone left on the machine
        if dashboard:
            # Ray's own processes (Ray Train's placement-group cleaner) ask the State API without an address, and
            # Ray then looks for the machine's last `ray start` cluster. Where that is another cluster, the cleaner
            # finds no controller there, takes it for dead and removes the run's placement group. Name this one's.
            port = _free_port()
            kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port,
                          runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
        _start_local(ray, num_cpus, kwargs)


LOCAL_START_TRIES = 2  # Ray waits 30 s (hard-coded) for its new raylet: a busy machine can take longer, once


def _start_local(ray, num_cpus: int | None, kwargs: dict) -> None:
    """`ray.init(address="local")`, tried again once when the new node does not come up in Ray's 30 s (three CLI
    runs starting their Rays at once on 2 busy cores did not), after stopping what the first try started."""
    for attempt in range(LOCAL_START_TRIES):
        try:
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(e) or attempt + 1 == LOCAL_START_TRIES:
                raise
            logging.getLogger(__name__).warning("the local Ray did not come up in time; starting it again")
            ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_token_auth() -> None:
    """Token authentication for the Ray this process is about to start (Ray's `RAY_AUTH_MODE=token`, with the token
    in `RAY_AUTH_TOKEN`, both as Ray 2.60 documents them): a fresh 256-bit token held only in the environment of this
    process and of the daemons and workers it starts, never written to disk, unless the operator gave one
    (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH). Ray binds its own ports to the node's routable address (ray.init turns
    127.0.0.1 into it), so on a shared network the token is what keeps another machine from submitting work.

    Ray reads the mode when it loads, before this runs: its config is read again, as Ray's own
    `enable_token_auth_by_default` does for a local `ray.init()`."""
    import secrets

    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    Config.initialize("")
