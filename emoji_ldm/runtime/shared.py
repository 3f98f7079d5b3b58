"""Shared-path checks and the cluster's most resources: a local path is refused where workers on other nodes must
reach it, and what a stage sizes by is what the cluster may grow to, not only what is up now.

An autoscaling cluster (KubeRay's `enableInTreeAutoscaling`; the GPU workers start at 0) has one node and no GPUs
when a job starts. Ray has no public API for the autoscaler's maximum, so the manifests in k8s/ declare it on the
head, whose environment every job driver inherits: $EMOJI_LDM_MAX_NODES, $EMOJI_LDM_MAX_CPUS and
$EMOJI_LDM_MAX_GPUS (the head plus each worker group's maxReplicas). Where a KubeRay autoscaler is on and a maximum
is not declared, the most is unknown: a local path is refused, and counts sized by it are left as asked.
"""

from __future__ import annotations

import os

SHARED_PATHS_ENV = "EMOJI_LDM_SHARED_PATHS"
MAX_NODES_ENV = "EMOJI_LDM_MAX_NODES"
MAX_ENV = {"CPU": "EMOJI_LDM_MAX_CPUS", "GPU": "EMOJI_LDM_MAX_GPUS"}
# the `ray start` line KubeRay gives the head's container: KubeRay adds --no-monitor when its in-tree autoscaler
# runs beside the head (ray-operator/controllers/ray/common/pod.go)
KUBERAY_START_ENV = "KUBERAY_GEN_RAY_START_CMD"


def cluster_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def autoscaler_on() -> bool:
    """Whether KubeRay's autoscaler may add nodes to this cluster (read from the head's environment)."""
    return "--no-monitor" in os.environ.get(KUBERAY_START_ENV, "").split()


def declared_max(env: str) -> int | None:
    """The maximum the manifests declare in $`env`, or None when unset."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        from emoji_ldm.errors import UserError

        raise UserError(f"${env}={raw!r} is not a whole number: set it to the most this Ray cluster may grow to "
                        "(the head plus every worker group's maxReplicas), or unset it")
    return int(raw)


def most(now: float, env: str) -> float | None:
    """The most of something the cluster may have: `now`, raised to the declared maximum in $`env`; None when an
    autoscaler may add more and no maximum is declared."""
    declared = declared_max(env)
    if declared is not None:
        return max(now, declared)
    return None if autoscaler_on() else now


def max_resources() -> dict | None:
    """`ray.cluster_resources()` with CPU and GPU raised to what the cluster may grow to; None when an autoscaler
    may add nodes and a maximum is not declared."""
    import ray

    resources = dict(ray.cluster_resources())
    for kind, env in MAX_ENV.items():
        limit = most(resources.get(kind, 0), env)
        if limit is None:
            return None
        resources[kind] = limit
    return resources


def require_shared(uri: str, what: str) -> None:
    """Refuse a local path that workers on other nodes must read or write, on a cluster that has, or may grow to,
    more than one node.

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
    limit = most(nodes, MAX_NODES_ENV)
    if limit is None or limit > 1:
        from emoji_ldm.errors import UserError

        now = f"has {nodes} node{'s' if nodes != 1 else ''}"
        if limit is None:
            size = f"{now} now and an autoscaler that may add more (${MAX_NODES_ENV} is not set)"
        else:
            size = now if limit == nodes else f"{now} now and may grow to {limit} (${MAX_NODES_ENV})"
        raise UserError(f"{what} is the local path {path!r}, but this Ray cluster {size} and workers "
                        f"on the others cannot reach it: use an s3:// URI, or list a filesystem every node "
                        f"mounts in ${SHARED_PATHS_ENV}")
