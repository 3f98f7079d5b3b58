"""Connecting to Ray: a running cluster when RAY_ADDRESS is set, else a local one."""

from __future__ import annotations

import ctypes
import functools
import logging
import math
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
    # Parquet through Ray Data's V1 datasource: the V2 one (Ray 2.60's default) held a whole folder's rows in
    # one read worker (50 files of 20,000 narrow rows: 713 MiB private at 1M rows, 301 MiB at 100k; V1 under
    # 150 MiB at both; bench/RESULTS.md "Data stages at scale", issue 28)
    ctx.use_datasource_v2 = False
    # a shuffle's map task partitions at most this much input at once (Ray's default, 1 GiB, made the task grow
    # with the shuffle: 400 MiB private for 1M build keys, 267 MiB with this)
    ctx.shuffle_input_batch_bytes = 4 * PARTITION_BYTES


# The GCS keeps an event record of every task for the dashboard and `ray list tasks`, about 3.5 KB each, up to
# Ray's default of 100,000 tasks: 23 -> 245 MiB over 60,000 no-op tasks, and encode's GCS 38 -> 58 MiB from 100k
# to 500k rows. The last 1,000 tasks are enough to debug a stage (a failed task's error reaches the driver and the
# job's log anyway), and keep the GCS flat: the store is full (~3.5 MiB) within the first minutes of a 100k-row
# stage, where 5,000 (~17 MiB) filled between 100k and 500k rows and grew the GCS 1.3x between them. Set on the
# head of every manifest in k8s/ too (bench/gcs_events.py).
TASK_EVENTS_ENV = "RAY_task_events_max_num_task_in_gcs"
TASK_EVENTS_IN_GCS = 1_000

# Ray runs its C++ daemons (the raylet on every node, the GCS on the head) on the jemalloc it ships
# (LD_PRELOAD of ray/core/libjemalloc.so), and jemalloc reads its options from MALLOC_CONF. Its per-thread
# caches keep what each of a daemon's threads freed: an idle raylet grew 8.8 -> 13.7 MiB private in 14 minutes
# and ~5 MiB an hour after that while its live heap stayed at 5 MB (jemalloc's own heap profile), so the raylet
# of a run 10x as long was 1.38x larger. Without the caches it stays at ~8 MiB (bench/raylet_growth.py --compare).
# Python processes run on glibc, which ignores MALLOC_CONF. infra/Dockerfile sets it for every pod in k8s/.
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
        ray.init(address="local", num_cpus=num_cpus, **kwargs)


@functools.cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def release_free_heap() -> None:
    """Hand the pages of memory this process has freed back to the OS: Arrow's memory pool (mimalloc in the
    wheels) and glibc's heaps (malloc_trim; a no-op on other C libraries).

    A model actor that runs batch after batch on Ray's threads frees its activations into glibc heaps that
    glibc keeps: bulk's model actor grew 520 -> 685 MiB private in 17 minutes, and stayed at ~470 with a
    trim after each batch (bench/bulk_actor_memory.py --ray --trim, issue 28). Called once a batch, it costs
    milliseconds against a batch's seconds."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


SHARED_PATHS_ENV = "EMOJI_LDM_SHARED_PATHS"


# A hash partition of a groupby or join is what one reduce task holds at once: sized so that it stays about
# this big however long the table (the partition count grows with the rows, not the memory of a task)
PARTITION_BYTES = 16 * 2**20
MAX_PARTITIONS = 16_384


def shuffle_partitions(data_bytes: int = 0) -> int:
    """Hash partitions of a Ray Data groupby or join that shuffles about `data_bytes`: at least two per CPU of
    the cluster (4 to 256: a laptop starts few tasks, a cluster spreads the work), and enough that one partition
    holds about PARTITION_BYTES (16 MiB), so that no reduce task grows with the table (up to MAX_PARTITIONS:
    256 GiB shuffled)."""
    import ray

    return partitions_for(data_bytes, int(ray.cluster_resources().get("CPU", 2)))


def partitions_for(data_bytes: int, cpus: int) -> int:
    """`shuffle_partitions` for a cluster of `cpus` CPUs."""
    by_cpus = max(4, min(256, 2 * cpus))
    return min(MAX_PARTITIONS, max(by_cpus, math.ceil(max(data_bytes, 0) / PARTITION_BYTES)))


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
