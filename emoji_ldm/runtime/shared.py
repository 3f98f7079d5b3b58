"""Shared-path checks: a local path is refused where workers on other nodes must reach it."""

from __future__ import annotations

import os

SHARED_PATHS_ENV = "EMOJI_LDM_SHARED_PATHS"


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
