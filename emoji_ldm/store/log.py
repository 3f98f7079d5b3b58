"""Delta-log helpers: which data files a version holds, which commit added a file, and where a row is.

What these read is the Delta log (add actions: one snapshot per version, O(files),
never a row), except `find_row`, which streams one narrow column of the files it
is given and then reads one row group. They serve `emoji-ldm lineage --row` and
the caption pass; commits themselves (`history`, `commit_metadata`) are in
`store.delta`.

    file_actions(table)          the loaded version's data files, with their log stats
    data_files(table)            their paths
    has_file(table, path)        whether the loaded version holds that file
    removed_files(older, newer)  files of `older` that `newer` no longer has
    table_at(uri, version)       a version, or None when it can no longer be loaded
    version_added(uri, path, n)  the version (<= n) whose commit added a file
    find_row(table, id, columns) (file, row) of a row id at the loaded version
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from emoji_ldm.store.delta import Table, arrow_dataset
from emoji_ldm.store.uri import storage_options


def file_actions(table: DeltaTable) -> pa.Table:
    """The data files of the table's loaded version, one row each, from the log's add actions (no data file is
    read): `path` (relative to the table), `size_bytes`, `num_records`, `null_count.<column>` and
    `partition.<column>` (the stats columns only where the writers kept stats)."""
    return pa.table(table.get_add_actions(flatten=True))


def data_files(table: DeltaTable) -> pa.ChunkedArray:
    """The paths of the data files of the table's loaded version, an Arrow column (the log: no data read)."""
    return file_actions(table).column("path")


def has_file(table: DeltaTable, path: str) -> bool:
    """Whether the table's loaded version holds data file `path` (Arrow compute over the log's paths)."""
    return bool(pc.any(pc.equal(data_files(table), path)).as_py())


def removed_files(older: DeltaTable, newer: DeltaTable) -> set[str]:
    """The files of `older` that `newer` no longer has: Arrow set difference, only the removed paths in Python."""
    before = data_files(older)
    return set(pc.filter(before, pc.invert(pc.is_in(before, value_set=data_files(newer)))).to_pylist())


def table_at(uri: str, version: int) -> Table | None:
    """The table at `version`, or None when that version can no longer be loaded (vacuumed, log cleaned)."""
    try:
        return Table(uri, version=version, storage_options=storage_options() or None)
    except TableNotFoundError:  # what delta-rs raises for a version whose log was cleaned up
        return None


def version_added(uri: str, path: str, upper: int) -> tuple[int, bool]:
    """The version (<= upper) whose commit added data file `path`, by binary search over snapshots; and whether
    a version that could not be loaded was met (the file may then be older than the answer).

    Cost: O(log versions) snapshots of the log, each O(files); no data file is read."""
    lo, hi, gone = -1, upper, False  # invariant: the file is in `hi`, and not in `lo` (-1: before the table)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        table = table_at(uri, mid)
        gone = gone or table is None
        if table is not None and has_file(table, path):
            hi = mid
        else:
            lo = mid
    return hi, gone


def find_row(table: DeltaTable, row_id: str, columns: list[str] | tuple[str, ...],
             only: set[str] | None = None) -> tuple[str, dict] | None:
    """(data file, row) of `row_id` at the table's loaded version, or None; the row has those of `columns` that
    the table has (leave out the image: it is not needed to say where a row came from).

    The `id` column streams through Arrow, file by file, until a batch holds the id (the files `only`,
    when given); from that file only the row group holding it is read. A pyarrow filter expression is
    not used: delta-rs writes string columns as string_view, which a string literal cannot compare with.
    """
    data = arrow_dataset(table)
    fragments = [f for f in data.get_fragments() if only is None or f.path in only]
    if not fragments:
        return None
    data = pds.FileSystemDataset(fragments, data.schema, data.format, data.filesystem)
    hit = next((t.fragment for t in data.scanner(columns=["id"]).scan_batches()
                if pc.index(t.record_batch.column(0), row_id).as_py() >= 0), None)
    if hit is None:
        return None
    wanted = [c for c in columns if c in data.schema.names]
    for group in hit.split_by_row_group():
        i = pc.index(group.to_table(schema=data.schema, columns=["id"]).column("id"), row_id).as_py()
        if i >= 0:
            return hit.path, group.to_table(schema=data.schema, columns=wanted).slice(i, 1).to_pylist()[0]
    return None
