"""Which rows differ between two versions of a table: the data files one holds and the other does not (from
the Delta log), and the ids of those files that the other side lacks (Ray Data anti-joins), so a diff or a
restore reads O(changed files), never the table."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.runtime.connect import ensure_ray
from emoji_ldm.runtime.partitions import shuffle_partitions
from emoji_ldm.store.uri import filesystem

ID_BYTES = 80  # an `id` (64 hex characters) in a shuffle


def changed_files(files: pa.Table, other: pa.Table) -> tuple[list[str], int]:
    """The data files of `files` (the log's add actions) that `other` does not hold, and their rows."""
    only = files.filter(pc.invert(pc.is_in(files.column("path"), value_set=other.column("path"))))
    return only.column("path").to_pylist(), int(pc.sum(pc.fill_null(only.column("num_records"), 0)).as_py() or 0)


def ids_not_in(uri: str, files: list[str], other: list[str], rows: int, sample: int) -> tuple[int, list[str]]:
    """How many ids of `files` are in none of `other` (data files of the table, `rows` in both), and a sorted
    sample."""
    if not files:
        return 0, []
    import ray.data

    ensure_ray()
    fs, root = filesystem(uri)

    def ids(paths: list[str]):
        return ray.data.read_parquet([f"{root.rstrip('/')}/{p}" for p in paths], filesystem=fs).select_columns(["id"])

    found = ids(files)
    if other:  # materialized: counting and sampling read the join's output, not run it twice
        found = found.join(ids(other), "left_anti", num_partitions=shuffle_partitions(rows * ID_BYTES),
                           on=("id",)).materialize()
    count = found.count()
    return count, sorted(r["id"] for r in found.take(sample)) if sample and count else []
