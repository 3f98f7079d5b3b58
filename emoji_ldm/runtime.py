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

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEPT_LOCAL_EXECUTION_WARNINGS", "1")
    kwargs = dict(include_dashboard=dashboard, logging_level=logging.WARNING, configure_logging=True)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    ctx = __import__("ray.data", fromlist=["DataContext"]).DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
