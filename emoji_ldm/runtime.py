"""Connecting to Ray: a running cluster when RAY_ADDRESS is set, else a local one."""

from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Start (or join) Ray once per process, quietly.

    Inside a Ray Job (KubeRay RayJob or `ray job submit`) RAY_ADDRESS points
    at the cluster and we join it; on a laptop we start a local instance.
    `dashboard=True` (the training stages) starts the dashboard too, about 3 s
    more: Ray Train's placement-group cleaner asks the State API, which the
    dashboard serves, and without it warns every few seconds.
    """
    import ray

    if not ray.is_initialized():
        _init(ray, num_cpus, dashboard)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
    # a UserError raised in a map function reaches the driver as itself (the CLI prints it as one line),
    # not as a UserCodeException that keeps only its text
    ctx.raise_original_map_exception = True


def _init(ray, num_cpus: int | None, dashboard: bool) -> None:
    os.environ.setdefault("RAY_ACCEPT_LOCAL_EXECUTION_WARNINGS", "1")
    kwargs = dict(include_dashboard=dashboard, logging_level=logging.WARNING, configure_logging=True)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # "local": always our own instance, never a `ray start` cluster someone left on the machine
        ray.init(address="local", num_cpus=num_cpus, **kwargs)


SHARED_PATHS_ENV = "EMOJI_LDM_SHARED_PATHS"


def shuffle_partitions() -> int:
    """Hash partitions of a Ray Data groupby or join: two per CPU of the cluster, 4 to 256 (a laptop starts few
    aggregators, a cluster spreads a large table)."""
    import ray

    return max(4, min(256, 2 * int(ray.cluster_resources().get("CPU", 2))))


def cluster_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared(uri: str, what: str) -> None:
    """Refuse a local path that workers on other nodes must read or write, on a multi-node cluster.

    S3 URIs and hub ids are fine; so is a local path under a prefix listed in
    $EMOJI_LDM_SHARED_PATHS (colon-separated), for a filesystem that every
    node mounts (NFS, a PVC with ReadWriteMany).
    """
    if not uri or not (uri.startswith("/") or uri.startswith("file://")):
        return
    path = uri.removeprefix("file://")
    shared = [p.rstrip("/") for p in os.environ.get(SHARED_PATHS_ENV, "").split(":") if p.strip()]
    if any(path == p or path.startswith(p + "/") for p in shared):
        return
    nodes = cluster_nodes()
    if nodes > 1:
        from emoji_ldm.errors import UserError

        raise UserError(f"{what} is the local path {path!r}, but this Ray cluster has {nodes} nodes and workers "
                        f"on the others cannot reach it: use an s3:// URI, or list a filesystem every node "
                        f"mounts in ${SHARED_PATHS_ENV}")
