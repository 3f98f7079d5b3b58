"""Delta Lake tables: the one versioned format every stage reads and writes.

Writes go through Ray Data (`Dataset.write_datasink(CommitDeltaDatasink(...))`,
Ray's public Datasink API): write tasks write Parquet files, the driver commits them in one Delta transaction
whose commit info carries our metadata under the key `emoji_ldm` (operation,
source, counts, config, code version, message, build id). A write that fails
or is killed before that commit leaves only unreferenced Parquet files: the
table stays at its last good version.

Tags, the image mode and a build's rejected inputs live beside the log, under
`_emoji_ldm/` (`sidecar.py`).

Reads in this process go through `open_table` (a `Table`) and `arrow_dataset`:
both read data files through a native Arrow filesystem, never through
deltalake's default Python `PyFileSystem` wrapper (see `Table` for why).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction, create_table_with_add_actions
from ray.data.datasource import Datasink

from emoji_ldm.errors import UserError
from emoji_ldm.runtime.heap import release_free_heap
from emoji_ldm.store.sidecar import read_tags
from emoji_ldm.store.uri import DatasetRef, filesystem, is_s3, normalize_uri, storage_options

logger = logging.getLogger(__name__)

META_KEY = "emoji_ldm"


def arrow_filesystem(uri: str) -> pafs.FileSystem:
    """A native Arrow filesystem rooted at the table folder `uri` (local or S3, `store.uri.filesystem`)."""
    fs, root = filesystem(uri)
    return pafs.SubTreeFileSystem(root.rstrip("/"), fs)


class Table(DeltaTable):
    """A `deltalake.DeltaTable` whose pyarrow datasets read through a native Arrow filesystem.

    Why: deltalake's default Python `PyFileSystem` wrapper lets Arrow's threads call into Python after a read
    has returned, which can abort or hang the process at exit (apache/arrow#34314; `test_store_exit.py`).
    """

    def to_pyarrow_dataset(self, partitions=None, filesystem=None, **kwargs) -> pds.Dataset:
        if filesystem is None:
            filesystem = arrow_filesystem(self.table_uri)
        return super().to_pyarrow_dataset(partitions=partitions, filesystem=filesystem, **kwargs)


def arrow_dataset(table: DeltaTable | DatasetRef | str) -> pds.Dataset:
    """The data of a table version as a pyarrow Dataset: the loaded version of `table`, or the referenced one.

    The read helper for the driver: stream it (`to_batches`, `scanner`, `head`), count it
    (`count_rows`), or read a few columns of a filtered slice (`to_table(columns=..., filter=...)`);
    never the whole table into one process. Reads through a native Arrow filesystem (see `Table`),
    so a process that used it exits cleanly.
    """
    if not isinstance(table, DeltaTable):
        table = open_table(table)
    return DeltaTable.to_pyarrow_dataset(table, filesystem=arrow_filesystem(table.table_uri))


def table_exists(uri: str) -> bool:
    return DeltaTable.is_deltatable(normalize_uri(uri), storage_options=storage_options())


def open_table(ref: DatasetRef | str) -> Table:
    """The table at the referenced version (latest when none); clear errors for unknown ones."""
    if isinstance(ref, str):
        ref = DatasetRef.parse(ref)
    try:
        table = Table(ref.uri, storage_options=storage_options())
    except TableNotFoundError:
        raise UserError(
            f"no dataset at {ref.uri!r}: build one with `emoji-ldm dataset build --out {ref.uri}`"
        ) from None
    except OSError as e:
        raise UserError(f"cannot open the dataset at {ref.uri!r}: {e}") from None
    version = ref.version
    if ref.tag is not None:
        tags = read_tags(ref.uri)
        if ref.tag not in tags:
            known = ", ".join(sorted(tags)) or "none"
            raise UserError(f"unknown tag {ref.tag!r} for {ref.uri!r} (tags: {known})")
        version = tags[ref.tag]
    if version is not None:
        latest = table.version()
        if not 0 <= version <= latest:
            raise UserError(f"unknown version {version} of {ref.uri!r}: versions are 0..{latest}")
        try:
            table.load_as_version(version)
        except TableNotFoundError as e:  # what delta-rs raises for a version whose log was cleaned up
            raise UserError(f"version {version} of {ref.uri!r} cannot be loaded: {e}") from None
    return table


def commit_meta(table_or_entry: dict) -> dict:
    meta = table_or_entry.get(META_KEY) or {}
    if isinstance(meta, str):  # written by hand or by another tool
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {"message": meta}
    return meta


def history(uri: str, limit: int | None = None, upto: int | None = None) -> list[dict[str, Any]]:
    """One dict per version, oldest first: version, time, operation, rows added/removed, message. The newest
    `limit` commits (all when None), or with `upto` the `limit` commits up to and including that version, read
    one commit file each however many came after it. Reads only the commits it returns."""
    if upto is None:
        entries = open_table(DatasetRef(normalize_uri(uri))).history(limit)
    else:
        first = 0 if limit is None else max(0, upto - limit + 1)
        entries = [e for e in (_commit_info(uri, v) for v in range(first, upto + 1)) if e is not None]
    rows = []
    for entry in entries:
        meta = commit_meta(entry)
        metrics = entry.get("operationMetrics") or {}
        counts = meta.get("counts") or {}
        rows.append(
            {
                "version": entry["version"],
                "time": dt.datetime.fromtimestamp(entry["timestamp"] / 1000, dt.timezone.utc),
                "operation": meta.get("operation") or entry.get("operation", "?").lower(),
                "rows_added": int(metrics.get("num_added_rows", counts.get("added", 0)) or 0),
                "rows_removed": int(metrics.get("num_deleted_rows", counts.get("removed", 0)) or 0),
                "message": meta.get("message", ""),
                "meta": meta,
            }
        )
    return sorted(rows, key=lambda r: r["version"])


def _commit_info(uri: str, version: int) -> dict | None:
    """The commitInfo action of one version, from its commit file in `_delta_log/` (the Delta protocol's layout),
    with its version; None when the log no longer holds that file (log retention) or it has none."""
    fs, root = filesystem(normalize_uri(uri))
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/_delta_log/{version:020d}.json") as f:
            lines = f.read().decode("utf-8").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        action = json.loads(line) if line.strip() else {}
        if "commitInfo" in action:
            return {**action["commitInfo"], "version": version}
    return None


def row_count(table: DeltaTable) -> int:
    """Rows at the table's loaded version, from the log's per-file stats (no data file is read)."""
    counts = pa.table(table.get_add_actions(flatten=True)).column("num_records")
    if counts.null_count:
        return arrow_dataset(table).count_rows()  # a writer that kept no stats: count, streaming
    return int(pc.sum(counts).as_py() or 0)


def commit_metadata(table: DeltaTable) -> dict:
    """The emoji-ldm metadata of the commit that made `table`'s loaded version (its commit file alone)."""
    entry = _commit_info(table.table_uri, table.version())
    return commit_meta(entry) if entry else {}


def version_for_build(uri: str, build_id: str, recent: int = 1000) -> int | None:
    """The version whose commit carries `build_id`, among the `recent` newest (concurrent writers may
    have committed after it)."""
    for row in reversed(history(uri, limit=recent)):
        if row["meta"].get("build_id") == build_id:
            return row["version"]
    return None


class CommitDeltaDatasink(Datasink):
    """A Ray Data sink that adds one Delta version, with our metadata, through Ray's public `Datasink` API.

    `write` runs in each write task: it streams the task's blocks into one
    Parquet file under the table folder (one per value of `partition_by`,
    under `COLUMN=VALUE/`), cast to `schema` so every version is
    self-describing, and returns the files' Delta add actions with their row
    counts. Files written by a job that dies before the commit are referenced
    by no version. `on_write_complete` runs once on the driver: it commits
    every add action in one transaction whose commit info carries `metadata`
    under `emoji_ldm`.
    """

    def __init__(self, uri: str, *, schema: pa.Schema, metadata: dict, mode: str = "append",
                 partition_by: str | None = None):
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be append or overwrite, got {mode!r}")
        if partition_by is not None and partition_by not in schema.names:
            raise ValueError(f"partition column {partition_by!r} is not in the schema")
        self.uri = normalize_uri(uri)
        self.schema, self.metadata, self.mode, self.partition_by = schema, metadata, mode, partition_by
        # Delta keeps partition values in the log, not in the data files
        self.file_schema = schema if partition_by is None else schema.remove(schema.get_field_index(partition_by))
        # built here, pickled into the write tasks: workers need not carry the S3 settings themselves
        self.fs, self.root = filesystem(self.uri)
        self.rows_written: int | None = None  # set on the driver by on_write_complete

    def write(self, blocks, ctx) -> list[AddAction]:
        from ray.data.block import BlockAccessor

        files: dict[str | None, tuple[str, object, object]] = {}  # partition value -> (name, stream, writer)
        rows: dict[str | None, int] = {}
        nulls: dict[str | None, dict[str, int]] = {}  # per file and column: the log's nullCount stats
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                for value, part in self._partitions(table):
                    if value not in files:
                        files[value] = self._open(value)
                    part = part.select(self.file_schema.names).cast(self.file_schema)
                    files[value][2].write_table(part)
                    rows[value] = rows.get(value, 0) + part.num_rows
                    counts = nulls.setdefault(value, dict.fromkeys(self.file_schema.names, 0))
                    for name in self.file_schema.names:
                        counts[name] += part.column(name).null_count
        finally:
            for _, stream, writer in files.values():
                writer.close()
                stream.close()
            # a worker runs write task after write task for the whole job: what this one freed goes back to
            # the OS, so the worker's memory is one task's, not the high-water mark of a long job
            release_free_heap()
        now = int(time.time() * 1000)
        return [AddAction(path=name, size=self.fs.get_file_info(f"{self.root.rstrip('/')}/{name}").size,
                          partition_values={} if value is None else {self.partition_by: value},
                          modification_time=now, data_change=True,
                          stats=json.dumps({"numRecords": rows[value], "nullCount": nulls[value]}))
                for value, (name, _, _) in files.items()]

    def _partitions(self, table: pa.Table):
        if table.num_rows == 0:
            return
        if self.partition_by is None:
            yield None, table
            return
        column = table.column(self.partition_by)
        for value in pc.unique(column).to_pylist():
            if value is None:
                raise ValueError(f"partition column {self.partition_by!r} has a null value")
            yield str(value), table.filter(pc.equal(column, value))

    def _open(self, value: str | None):
        folder = "" if value is None else f"{self.partition_by}={value}/"
        name = f"{folder}part-{uuid.uuid4().hex}.parquet"
        path = f"{self.root.rstrip('/')}/{name}"
        if not is_s3(self.uri):  # S3 has no folders (create_dir would leave an empty marker object)
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        stream = self.fs.open_output_stream(path)
        return name, stream, pq.ParquetWriter(stream, self.file_schema)

    def on_write_complete(self, write_result) -> None:
        self.commit([a for r in write_result.write_returns if r for a in r])

    def commit(self, actions: list, removes: list[dict] | None = None, read_version: int | None = None) -> None:
        """One Delta commit of `actions` (and `removes`, files of `read_version` that the write replaces,
        each `{"path": relative path, "size": bytes}`: Delta's RemoveActions do not pickle, so write tasks
        return plain dicts and the actions are made here, on the driver)."""
        self.rows_written = sum(json.loads(a.stats)["numRecords"] for a in actions)
        now = int(time.time() * 1000)
        removes = [RemoveAction(path=f["path"], data_change=True, deletion_timestamp=now, size=f["size"])
                   for f in removes or []]
        props = CommitProperties(custom_metadata={META_KEY: self.metadata})
        delta_schema = Schema.from_arrow(self.schema)
        options = storage_options() or None
        partition_by = [self.partition_by] if self.partition_by else None
        if not table_exists(self.uri):
            try:
                create_table_with_add_actions(
                    table_uri=self.uri, schema=delta_schema, add_actions=actions,
                    mode="overwrite" if self.mode == "overwrite" else "error", partition_by=partition_by,
                    storage_options=options, commit_properties=props,
                )
                return
            except DeltaError:
                # Another writer created the table first (concurrent builds): append to it.
                if not table_exists(self.uri):
                    raise
        # from the version the removed files were read at, so a concurrent commit is checked for conflicts
        table = DeltaTable(self.uri, version=read_version, storage_options=options)
        table.create_write_transaction(actions=actions + removes, mode=self.mode, schema=delta_schema,
                                       partition_by=partition_by, commit_properties=props)


def append_rows(uri: str, rows: pa.Table, metadata: dict) -> int:
    """Append a small in-memory Arrow table (one chunk of a job's output) as one Delta commit whose commit
    info carries `metadata` under `emoji_ldm`; creates the table on the first call. Returns the table's
    latest version after the commit (a concurrent writer's, if one committed since)."""
    uri = normalize_uri(uri)
    options = storage_options() or None
    write_deltalake(uri, rows, mode="append", storage_options=options,
                    commit_properties=CommitProperties(custom_metadata={META_KEY: metadata}))
    return DeltaTable(uri, storage_options=options).version()


def delete_matching(uri: str, keys: pa.Table, metadata: dict) -> int:
    """Delete, in one commit carrying `metadata`, every row whose values in all of `keys`' columns equal
    one row of `keys` (a Delta MERGE ... WHEN MATCHED DELETE); returns how many rows it deleted.

    `keys` is held in memory: pass only the keys of the rows to delete (the work asked for), never a
    table's worth. Nothing is committed when `keys` is empty."""
    if keys.num_rows == 0:
        return 0
    predicate = " AND ".join(f"t.{name} = s.{name}" for name in keys.column_names)
    result = (open_table(uri)
              .merge(source=keys, predicate=predicate, source_alias="s", target_alias="t",
                     commit_properties=CommitProperties(custom_metadata={META_KEY: metadata}))
              .when_matched_delete()
              .execute())
    return int(result.get("num_target_rows_deleted", 0))


def partition_columns(table: DeltaTable) -> list[str]:
    """The partition columns of `table` (from its metadata; [] when unpartitioned)."""
    return list(table.metadata().partition_columns or [])


def read_dataset(ref: DatasetRef | str, columns: list[str] | None = None):
    """A Ray Dataset of the table at the referenced version (tags resolved); returns (dataset, version)."""
    import ray.data

    if isinstance(ref, str):
        ref = DatasetRef.parse(ref)
    version = open_table(ref).version()
    ds = ray.data.read_delta(ref.uri, version=version, columns=columns, storage_options=storage_options() or None)
    return ds, version
