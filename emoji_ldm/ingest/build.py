"""`build_dataset`: source -> Ray Data (fetch, decode, clean, hash, de-duplicate) -> one new Delta version.

One streaming Ray Data pipeline; the driver holds no item, id or image:
  1. the source as a Ray Dataset of items (`emoji_ldm.sources.source_dataset`:
     folders listed in tasks, URL lists read by Ray's readers, `synthetic:N`
     from `range`);
  2. `ingest_batch` in tasks: read, download or draw the bytes (threads,
     timeouts, retries, per-host limit), clean with `clean_image`, hash;
  3. de-duplicate by content hash in Ray Data: the table's `id` column joins
     the stream (`union`), `groupby(_group).map_groups(resolve_group)` keeps the
     first new row of each hash (smallest source URL) and marks the rest
     `duplicate_in_build` or `duplicate_in_table`;
  4. `BuildSink`: write tasks write the kept rows as Parquet and the rejected
     inputs (with reasons) as sidecar Parquet under `_emoji_ldm/rejects/`, and
     return per-task counts; the driver sums them and makes one Delta commit
     that records operation, source, counts, config and code version.
Cost: O(items of the build) plus a read of the table's `id` column (about 70
bytes a row); the driver's memory does not grow with either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.errors import UserError
from emoji_ldm.ingest.images import ImageConfig
from emoji_ldm.ingest.tasks import ingest_batch, resolve_group, table_id_rows
from emoji_ldm.options import opt
from emoji_ldm.runtime import ensure_ray
from emoji_ldm.sources import FetchConfig, open_source
from emoji_ldm.store.delta import (
    REJECT_SCHEMA,
    CommitDeltaDatasink,
    open_table,
    read_dataset,
    rejects_uri,
    table_exists,
    version_for_build,
)
from emoji_ldm.store.schema import EMOJI_SCHEMA
from emoji_ldm.store.uri import check_s3_bucket, filesystem, is_s3, normalize_uri
from emoji_ldm.version import code_version

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class BuildConfig:
    source: str = opt(help="twemoji | dir:PATH | urls:FILE (.txt, .csv or .parquet; local or s3://) | "
                           "synthetic:N[:SEED] (N generated emoji-like images, for load tests)")
    out: str = opt(help="dataset URI: a local path or s3://bucket/prefix")
    image: ImageConfig = opt(default_factory=ImageConfig, help="how images are normalised")
    fetch: FetchConfig = opt(default_factory=FetchConfig, help="how URL items are downloaded")
    limit: int | None = opt(None, help="ingest at most N source items")
    message: str = opt("", help="a note recorded with the new version")
    batch_size: int = opt(128, help="images per Ray Data batch")

    def __post_init__(self):
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be a positive number of images, got {self.limit}")
        if self.batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        object.__setattr__(self, "out", normalize_uri(self.out))


@dataclass
class BuildSummary:
    out: str
    version: int | None  # the new version, None when nothing was added
    images_in: int
    accepted: int
    rejected: dict[str, int]
    duplicates_in_build: int
    duplicates_in_table: int
    added: int
    seconds: float
    rejects_uri: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # seconds: list, ray_start, ingest, write

    @property
    def images_per_s(self) -> float:
        return self.images_in / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        rejects = f"rejected inputs with reasons: {self.rejects_uri}\n" if self.rejects_uri else ""
        return rejects + self.line()

    def line(self) -> str:
        rej = sum(self.rejected.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
        where = f"version {self.version} of {self.out}" if self.version is not None else f"no new version of {self.out}"
        return (
            f"build: {self.images_in} in, {self.accepted} accepted, {rej} rejected"
            + (f" ({reasons})" if reasons else "")
            + f", {self.duplicates_in_build + self.duplicates_in_table} duplicates"
            + f" ({self.duplicates_in_build} in build, {self.duplicates_in_table} already in table)"
            + f", {self.added} added -> {where} | {self.seconds:.1f} s, {self.images_per_s:.0f} images/s"
        )


DUPLICATES = ("duplicate_in_build", "duplicate_in_table")


class BuildSink(CommitDeltaDatasink):
    """`CommitDeltaDatasink` for a build's resolved stream: rows with a `_reason` are not written.

    Each write task writes its kept rows as Parquet (the parent's `write`), its rejected inputs
    to `_emoji_ldm/rejects/build-<id>/part-<uuid>.parquet`, and returns its counts. On the driver,
    `on_write_complete` sums the counts into the commit metadata and commits once, or not at all
    when nothing was added.
    """

    def __init__(self, uri: str, build_id: str, metadata: dict):
        super().__init__(uri, schema=EMOJI_SCHEMA, metadata=metadata)
        self.build_id = build_id
        self.rejects = rejects_uri(uri, build_id)
        self.counts: Counter = Counter()
        self.rejected: Counter = Counter()
        self.version: int | None = None

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        counts, reasons = Counter(), Counter()
        rejects: list[pa.Table] = []

        def kept():
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if table.num_rows == 0:  # an empty shuffle partition's block may carry no columns
                    continue
                reason = table.column("_reason")
                counts["in"] += table.num_rows
                if reason.null_count < table.num_rows:
                    values = pc.value_counts(reason.drop_null())
                    reasons.update(dict(zip(values.field("values").to_pylist(), values.field("counts").to_pylist())))
                    real = pc.invert(pc.is_in(reason, pa.array(DUPLICATES)))
                    bad = table.filter(pc.and_(pc.is_valid(reason), real))
                    if bad.num_rows:
                        rejects.append(bad.select(["source_url", "_reason", "_detail"]).rename_columns(
                            REJECT_SCHEMA.names).cast(REJECT_SCHEMA))
                yield table.filter(pc.is_null(reason))

        actions = super().write(kept(), ctx)
        if rejects:
            self._write_rejects(pa.concat_tables(rejects))
        return {"actions": actions, "counts": dict(counts), "reasons": dict(reasons)}

    def _write_rejects(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        fs, folder = filesystem(self.rejects)
        if not is_s3(self.uri):
            fs.create_dir(folder, recursive=True)
        pq.write_table(table, f"{folder.rstrip('/')}/part-{uuid.uuid4().hex}.parquet", filesystem=fs)

    def on_write_complete(self, write_result) -> None:
        actions = []
        for r in write_result.write_returns:
            actions += r["actions"]
            self.counts.update(r["counts"])
            self.rejected.update(r["reasons"])
        if not actions:
            return
        self.metadata = {**self.metadata, "counts": self.summary_counts(sum(
            json.loads(a.stats)["numRecords"] for a in actions))}
        self.commit(actions)
        self.version = version_for_build(self.uri, self.build_id)

    def summary_counts(self, added: int) -> dict:
        rejected = {k: v for k, v in self.rejected.items() if k not in DUPLICATES}
        return {"in": self.counts["in"], "accepted": self.counts["in"] - sum(rejected.values()),
                "rejected": rejected, "duplicates_in_build": self.rejected["duplicate_in_build"],
                "duplicates_in_table": self.rejected["duplicate_in_table"], "added": added}


def _partitions() -> int:
    """Hash partitions of the de-duplication shuffle: two per CPU of the cluster, 4..256."""
    import ray

    return max(4, min(256, 2 * int(ray.cluster_resources().get("CPU", 2))))


def build_dataset(config: BuildConfig) -> BuildSummary:
    """Build (or append to) the dataset at `config.out` from `config.source`: one new version."""
    start = time.perf_counter()
    check_s3_bucket(config.out)
    source = open_source(config.source)  # checks the spec on the driver, before Ray starts
    if table_exists(config.out):
        open_table(config.out)  # a clear error now for a table that cannot be read
    ensure_ray()
    summary = ingest_dataset(source.dataset(config.limit), config, start=start)
    if summary.images_in == 0:
        raise UserError(f"build: the source {config.source!r} yielded no items; nothing was written to {config.out}")
    if summary.accepted == 0:  # everything rejected: say so and fail, rather than exit 0 with nothing
        raise UserError(f"{summary.line()}: no image was accepted; reasons per input in {summary.rejects_uri}")
    return summary


def ingest_dataset(items, config: BuildConfig, *, extra_metadata: dict | None = None,
                   start: float | None = None) -> BuildSummary:
    """Stages 2-4 for a Ray Dataset of items (`ITEM_SCHEMA`; from `build_dataset`, or from the crawler)."""
    start = start or time.perf_counter()
    ensure_ray()
    build_id = uuid.uuid4().hex[:12]
    logger.info("build %s: %s -> %s", build_id, config.source, config.out)
    work = items.map_batches(ingest_batch, fn_kwargs={"image": config.image, "fetch": config.fetch},
                             batch_format="pyarrow", batch_size=config.batch_size)
    if table_exists(config.out):
        ids, _ = read_dataset(config.out, columns=["id"])
        work = work.union(ids.map_batches(table_id_rows, batch_format="pyarrow"))
    resolved = work.groupby("_group", num_partitions=_partitions()).map_groups(resolve_group,
                                                                               batch_format="pyarrow")
    metadata = {
        "operation": "build",
        "source": config.source,
        "config": _jsonable(dataclasses.asdict(config)),
        "code_version": code_version(),
        "message": config.message,
        "build_id": build_id,
        "rejects": rejects_uri(config.out, build_id),
        **_jsonable(extra_metadata or {}),
    }
    sink = BuildSink(config.out, build_id, metadata)
    resolved.write_datasink(sink)
    counts = sink.summary_counts(sink.rows_written or 0)
    rejected = sum(counts["rejected"].values())
    return BuildSummary(
        out=config.out, version=sink.version, images_in=counts["in"], accepted=counts["accepted"],
        rejected=counts["rejected"], duplicates_in_build=counts["duplicates_in_build"],
        duplicates_in_table=counts["duplicates_in_table"], added=counts["added"],
        seconds=time.perf_counter() - start, rejects_uri=sink.rejects if rejected else None,
        phases={"total": round(time.perf_counter() - start, 3)},
    )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
