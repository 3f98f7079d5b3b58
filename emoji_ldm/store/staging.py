"""Per-data-file staging: narrow rows that a later Ray task applies to one Delta data file.

A pass that changes rows of a table (captions for the caption stage, duplicate
drops for a build) stages its per-row results as small Parquet files under a
run folder, one sub-folder per data file they touch (`<run>/<hash of the
file>/part-<uuid>.parquet`, each with a `_file` column naming the data file).
One task per touched data file then reads its folder and rewrites that file.
A staged file appears whole or not at all (S3 uploads complete atomically;
locally it is written, then renamed), so a killed pass leaves only complete
staged files, which a re-run can reuse.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from emoji_ldm.store.schema import value_counts
from emoji_ldm.store.uri import filesystem, is_s3, join


def folder_name(file: str) -> str:
    return hashlib.sha1(file.encode()).hexdigest()[:20]


def write_atomic(fs, folder: str, table: pa.Table, s3: bool) -> None:
    name = f"part-{uuid.uuid4().hex}.parquet"
    if s3:  # an S3 object appears whole when its upload completes
        pq.write_table(table, f"{folder}/{name}", filesystem=fs)
        return
    fs.create_dir(folder, recursive=True)
    pq.write_table(table, f"{folder}/.{name}.tmp", filesystem=fs)
    fs.move(f"{folder}/.{name}.tmp", f"{folder}/{name}")


class FileStagingSink(Datasink):
    """Write tasks stage their rows (with a `_file` column) per data file under `run`.

    Returns, on the driver, `rows` staged and `reasons` (counts of the `_reason` column, if any).
    """

    def __init__(self, run: str, schema: pa.Schema):
        self.run, self.schema = run, schema
        self.fs, self.root = filesystem(run)
        self.rows = 0
        self.reasons: Counter = Counter()

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        parts = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        parts = [p.select(self.schema.names).cast(self.schema) for p in parts if p.num_rows]
        if not parts:
            return {"rows": 0, "reasons": {}}
        table = pa.concat_tables(parts)
        for file in pc.unique(table.column("_file")).to_pylist():
            rows = table.filter(pc.equal(table.column("_file"), file))
            write_atomic(self.fs, f"{self.root.rstrip('/')}/{folder_name(file)}", rows, is_s3(self.run))
        reasons = {}
        if "_reason" in table.column_names:
            reasons = value_counts(table.column("_reason"))
        return {"rows": table.num_rows, "reasons": reasons}

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.rows += r["rows"]
            self.reasons.update(r["reasons"])


def folder_dataset(run: str, files: pa.Array):
    """The staging folders under `run` of the data files a pass may have touched (`files`: their paths, relative
    to the table, as the `_file` column names them), as a Ray Dataset of `folder` for the rewrite's tasks.
    Named from the files, never listed from storage (on S3 a listing would return every staged part: write
    tasks x files); a folder that holds nothing reads as empty (`read_folder`). None when `files` is empty."""
    import ray.data

    names = pc.unique(files)
    if len(names) == 0:
        return None
    return ray.data.from_arrow(pa.table({"_file": names})).repartition(min(len(names), 256)).map_batches(
        _folders, fn_kwargs={"run": run}, batch_format="pyarrow")


def _folders(batch: pa.Table, run: str) -> pa.Table:
    return pa.table({"folder": pa.array([join(run, folder_name(f)) for f in batch.column("_file").to_pylist()],
                                        pa.string())})


def has_staged(run: str) -> bool:
    """Whether anything is staged under `run` (one lookup: on S3 a prefix with objects is a directory)."""
    fs, path = filesystem(run)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_folder(folder: str, schema: pa.Schema) -> pa.Table:
    """The staged rows of one data file (small: at most that file's rows, narrow columns); empty when none."""
    fs, path = filesystem(folder)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return schema.empty_table()
    return pds.dataset(path, filesystem=fs, format="parquet", schema=schema,
                       exclude_invalid_files=False, ignore_prefixes=[".", "_"]).to_table()


def remove_run(run: str) -> None:
    """Delete a finished run's staging folder."""
    fs, path = filesystem(run)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
