"""Sizing the hash partitions of a Ray Data groupby or join, so that no reduce task grows with the table."""

from __future__ import annotations

import math

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
    return max(by_cpus, partitions_by_bytes(data_bytes))


def partitions_by_bytes(data_bytes: int) -> int:
    """Partitions of about PARTITION_BYTES each for `data_bytes` (1 to MAX_PARTITIONS), with no floor by CPUs:
    for a step that is one block when it is small."""
    return min(MAX_PARTITIONS, max(1, math.ceil(max(data_bytes, 0) / PARTITION_BYTES)))
