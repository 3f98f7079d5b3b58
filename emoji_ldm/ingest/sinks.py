"""The two Delta sinks of a build (see build.py's steps): `BuildSink` writes the accepted rows as uncommitted
data files, the rejects and each written row's narrow key; `DedupeSink` rewrites the data files that hold
duplicates without them. Neither commits: the build commits every data file in one transaction."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.ingest.tasks import DROP_SCHEMA, KEY_SCHEMA
from emoji_ldm.store.delta import CommitDeltaDatasink
from emoji_ldm.store.schema import EMOJI_SCHEMA, value_counts
from emoji_ldm.store.sidecar import REJECT_SCHEMA, rejects_uri
from emoji_ldm.store.staging import read_folder, write_atomic
from emoji_ldm.store.uri import filesystem, is_s3, join


class BuildSink(CommitDeltaDatasink):
    """Step 2's sink: write tasks write the accepted rows (images included) as data files of the table,
    not yet committed; the rejected inputs to `_emoji_ldm/rejects/build-<id>/`; and the narrow key of
    every written row (id, source URL, data file, row position) to the build's `keys/` folder.
    The driver gets back only the files' add actions and the counts.
    """

    def __init__(self, uri: str, build_id: str, work: str):
        super().__init__(uri, schema=EMOJI_SCHEMA, metadata={})
        self.rejects = rejects_uri(uri, build_id)
        self.keys = join(work, "keys")
        self.actions: list = []
        self.counts: Counter = Counter()
        self.rejected: Counter = Counter()
        self.alpha: Counter = Counter()

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        counts, reasons, alpha = Counter(), Counter(), Counter()
        rejects, keys = [], []

        def accepted():
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if table.num_rows == 0:  # an empty block may carry no columns
                    continue
                counts["in"] += table.num_rows
                reason = table.column("_reason")
                if reason.null_count < table.num_rows:
                    reasons.update(value_counts(reason))
                    bad = table.filter(pc.is_valid(reason))
                    rejects.append(bad.select(["source_url", "_reason", "_detail"]).rename_columns(
                        REJECT_SCHEMA.names).cast(REJECT_SCHEMA))
                good = table.filter(pc.is_null(reason))
                alpha.update(value_counts(good.column("_alpha")))
                keys.append(good.select(["id", "source_url", "page_url"]))
                yield good

        actions = super().write(accepted(), ctx)  # one data file per task: rows in the order written
        fs, _ = filesystem(self.uri)
        if rejects:
            write_atomic(fs, filesystem(self.rejects)[1], pa.concat_tables(rejects), is_s3(self.uri))
        if actions:
            (action,) = actions
            rows = pa.concat_tables(keys)
            rows = rows.append_column("_file", pa.array([action.path] * rows.num_rows, pa.string()))
            rows = rows.append_column("_pos", pa.array(range(rows.num_rows), pa.int64()))
            rows = rows.append_column("_from_table", pa.array([False] * rows.num_rows))
            write_atomic(fs, filesystem(self.keys)[1], rows.cast(KEY_SCHEMA), is_s3(self.uri))
        return {"actions": actions, "counts": dict(counts), "reasons": dict(reasons), "alpha": dict(alpha)}

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.actions += r["actions"]
            self.counts.update(r["counts"])
            self.rejected.update(r["reasons"])
            self.alpha.update(r["alpha"])


class DedupeSink(CommitDeltaDatasink):
    """Step 4's sink: one write task per data file that has duplicates rewrites it without them (and
    deletes the uncommitted original); the driver then commits every data file in one transaction."""

    def __init__(self, uri: str, metadata: dict):
        super().__init__(uri, schema=EMOJI_SCHEMA, metadata=metadata)
        self.replaced: dict[str, list] = {}  # original file -> its rewritten add actions
        self.version: int | None = None

    def write(self, blocks, ctx) -> dict:
        import pyarrow.parquet as pq
        from ray.data.block import BlockAccessor

        replaced = {}
        for block in blocks:
            for folder in BlockAccessor.for_block(block).to_arrow().column("folder").to_pylist():
                drops = read_folder(folder, DROP_SCHEMA)
                if drops.num_rows == 0:  # nothing to drop from this file: kept as written
                    continue
                file = drops.column("_file")[0].as_py()  # a drops folder holds the rows of one source file
                source = f"{self.root.rstrip('/')}/{file}"
                with self.fs.open_input_file(source) as f:
                    replaced[file] = super().write(_without(pq.ParquetFile(f), drops.column("_pos")), ctx)
                self.fs.delete_file(source)  # never committed: no version refers to it
        return replaced

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.replaced.update(r)


def _without(reader, positions: pa.Array):
    """The rows of a Parquet file, batch by batch, except those at `positions`."""
    offset = 0
    for batch in reader.iter_batches(batch_size=1024):
        index = pa.array(range(offset, offset + batch.num_rows), pa.int64())
        offset += batch.num_rows
        yield pa.Table.from_batches([batch]).filter(pc.invert(pc.is_in(index, value_set=positions)))
