"""`build_dataset`: source -> Ray Data (fetch, decode, clean, hash) -> de-duplicate -> one new Delta version.

Streaming Ray Data throughout; the driver holds no item, id or image, only the
new data files' add actions and counts:
  1. the source as a Ray Dataset of items (`emoji_ldm.sources.source_dataset`:
     folders listed in tasks, URL lists read by Ray's readers, `synthetic:N`
     from `range`);
  2. `ingest_batch` in tasks: read, download or draw the bytes (threads,
     timeouts, retries, per-host limit), clean with `clean_image`, hash; then
     `BuildSink`'s write tasks (sinks.py) write the accepted rows as data files of the
     table (not yet part of any version), the rejected inputs with reasons to
     `_emoji_ldm/rejects/build-<id>/`, and each written row's narrow key
     (id, source URL, data file, row position) to a work folder;
  3. de-duplication shuffles only those keys, never the images: the table's
     `id` column joins them (`union`), a `groupby` on the content hash keeps,
     of identical images, the one with the smallest source URL (the same
     choice whatever order tasks finish in) and stages the rows to drop
     (`duplicate_in_build`, `duplicate_in_table`) per data file;
  4. one task per data file holding duplicates rewrites it without them;
  5. the driver commits every data file in one Delta transaction whose
     metadata records operation, source, counts, config and code version.
A build killed before step 5 leaves the table at its last good version (its
files are referenced by no version). Cost: the new items, plus the table's
`id` column (about 70 bytes a row) in the shuffle; no process holds the
build's images beyond a batch.
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

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.imaging import ImageConfig
from emoji_ldm.ingest.sinks import BuildSink, DedupeSink
from emoji_ldm.ingest.tasks import DROP_SCHEMA, KEY_SCHEMA, ingest_batch, resolve_group, table_key_rows
from emoji_ldm.runtime.connect import ensure_ray
from emoji_ldm.runtime.partitions import shuffle_partitions
from emoji_ldm.runtime.shared import require_shared
from emoji_ldm.sources import FetchConfig, open_source
from emoji_ldm.store.delta import (
    CommitDeltaDatasink,
    open_table,
    read_dataset,
    row_count,
    table_exists,
    version_for_build,
)
from emoji_ldm.store.schema import EMOJI_SCHEMA, value_counts
from emoji_ldm.store.sidecar import SIDECAR, image_mode, record_image_mode
from emoji_ldm.store.staging import (
    FileStagingSink,
    folder_dataset,
    folder_name,
    remove_run,
    write_atomic,
)
from emoji_ldm.store.uri import check_s3_bucket, filesystem, is_s3, join, normalize_uri
from emoji_ldm.version import code_version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    source: str = opt(help="twemoji | noto | openmoji | several sets joined by '+' (twemoji+noto+openmoji) | "
                           "dir:PATH | urls:FILE (.txt, .csv or .parquet; local or s3://) | "
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
    alpha: dict[str, int] = field(default_factory=dict)  # accepted images by what happened to their alpha

    @property
    def images_per_s(self) -> float:
        return self.images_in / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        rejects = f"rejected inputs with reasons: {self.rejects_uri}\n" if self.rejects_uri else ""
        return rejects + self.line()

    def line(self) -> str:
        rej = sum(self.rejected.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
        alpha = ", ".join(f"{k} {v}" for k, v in sorted(self.alpha.items(), key=lambda kv: -kv[1]))
        where = f"version {self.version} of {self.out}" if self.version is not None else f"no new version of {self.out}"
        return (
            f"build: {self.images_in} in, {self.accepted} accepted"
            + (f" ({alpha})" if alpha else "")
            + f", {rej} rejected"
            + (f" ({reasons})" if reasons else "")
            + f", {self.duplicates_in_build + self.duplicates_in_table} duplicates"
            + f" ({self.duplicates_in_build} in build, {self.duplicates_in_table} already in table)"
            + f", {self.added} added -> {where} | {self.seconds:.1f} s, {self.images_per_s:.0f} images/s"
        )


ROWS_PER_FILE_64PX = 20_000  # about 50 MB of 64 x 64 PNGs


def rows_per_file(size: int) -> int:
    """Rows of one data file for images of `size` x `size`: about the bytes of 20,000 at 64 px (256 at least)."""
    return max(256, ROWS_PER_FILE_64PX * 64 * 64 // (size * size))


# A build this small is de-duplicated on the driver from its narrow keys (at most ~30 MB of them), with
# one streaming scan of a table's `id` column this small; bigger ones shuffle the keys in Ray Data.
LOCAL_DEDUPE_KEYS = 200_000
LOCAL_DEDUPE_TABLE_ROWS = 5_000_000
# a key row in the shuffle: a 64-character id, the source and page URLs, a data file's name, a position
KEY_ROW_BYTES = 250


def _dedupe_small(uri: str, keys_uri: str, drops_uri: str, table: bool) -> Counter:
    """`_dedupe_in_ray` for a small build: the same rule, vectorised with Arrow on the driver."""
    import pyarrow.dataset as pds

    fs, path = filesystem(keys_uri)
    keys = pds.dataset(path, filesystem=fs, format="parquet", schema=KEY_SCHEMA,
                       ignore_prefixes=[".", "_"]).to_table()
    known = pa.array([], pa.string())
    if table:  # ids of the build that the table already holds: one scan of the id column, filtered
        ids = pc.unique(keys.column("id"))
        hits = open_table(uri).to_pyarrow_dataset().to_table(columns=["id"], filter=pc.field("id").isin(ids))
        known = pc.unique(hits.column("id"))
    keys = keys.sort_by([("id", "ascending"), ("source_url", "ascending"), ("page_url", "ascending")])
    ids = keys.column("id").combine_chunks()
    # the first row of each id in sorted order: its id differs from the row before
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids.slice(1), ids.slice(0, max(len(ids) - 1, 0)))])
    in_table = pc.is_in(ids, value_set=known)
    reason = pc.if_else(in_table, "duplicate_in_table", pc.if_else(first, pa.scalar(None, pa.string()),
                                                                      "duplicate_in_build"))
    drops = pa.table({"_file": keys.column("_file"), "_pos": keys.column("_pos"), "_reason": reason},
                     schema=DROP_SCHEMA).filter(pc.is_valid(reason))
    fs, root = filesystem(drops_uri)
    for file in pc.unique(drops.column("_file")).to_pylist():
        write_atomic(fs, f"{root.rstrip('/')}/{folder_name(file)}",
                     drops.filter(pc.equal(drops.column("_file"), file)), is_s3(uri))
    return Counter(value_counts(drops.column("_reason")))


def _dedupe_in_ray(uri: str, keys_uri: str, drops_uri: str, rows: int, files: int) -> Counter:
    """Stage the written rows to drop, per data file: a Ray Data groupby on the content hash over the build's
    keys (`files` key files, one per data file) and the table's ids (`rows` in all). Every task's share stays
    the same as the build grows: one key file per read task, and partitions that grow with the rows."""
    import ray.data

    fs, keys_path = filesystem(keys_uri)
    keys = ray.data.read_parquet(keys_path, filesystem=fs, override_num_blocks=files)
    if table_exists(uri):
        ids, _ = read_dataset(uri, columns=["id"])
        keys = keys.union(ids.map_batches(table_key_rows, batch_format="pyarrow"))
    drops = FileStagingSink(drops_uri, DROP_SCHEMA)
    partitions = shuffle_partitions(rows * KEY_ROW_BYTES)
    keys.groupby("id", num_partitions=partitions).map_groups(resolve_group, batch_format="pyarrow") \
        .write_datasink(drops)
    return drops.reasons


def build_dataset(config: BuildConfig) -> BuildSummary:
    """Build (or append to) the dataset at `config.out` from `config.source`: one new version."""
    start = time.perf_counter()
    check_s3_bucket(config.out)
    source = open_source(config.source)  # checks the spec on the driver, before Ray starts
    if table_exists(config.out):
        open_table(config.out)  # a clear error now for a table that cannot be read
    ensure_ray()
    require_shared(config.out, "the dataset (--out)")
    if getattr(source, "local_path", None):  # a folder or URL list that the tasks read, on any node
        require_shared(source.local_path, f"the source {config.source!r}")
    # record the source as resolved (`dir:/abs/path`, not the path as typed): lineage reads it from elsewhere
    config = dataclasses.replace(config, source=getattr(source, "spec", config.source))
    summary = ingest_dataset(source.dataset(config.limit), config, start=start)
    if summary.images_in == 0:
        raise UserError(f"build: the source {config.source!r} yielded no items; nothing was written to {config.out}")
    if summary.accepted == 0:  # everything rejected: say so and fail, rather than exit 0 with nothing
        raise UserError(f"{summary.line()}: no image was accepted; reasons per input in {summary.rejects_uri}")
    return summary


def image_config_for(uri: str, image: ImageConfig) -> ImageConfig:
    """`image`, checked against the table at `uri`: new rows must have the mode its rows have (RGBA, or RGB for a
    table built with `--background`)."""
    if not table_exists(uri):
        return image
    mode = image_mode(uri)
    if mode == "RGBA" and image.background is not None:
        raise UserError(f"{uri} stores RGBA images, so --background {image.background!r} would mix RGB rows "
                        "into it: build into a new --out to flatten, or leave --background out")
    if mode == "RGB" and image.background is None:
        raise UserError(f"{uri} stores RGB images (it was built with --background), so new images with alpha "
                        "would mix RGBA rows into it: pass the same --background, or build into a new --out "
                        "to keep alpha")
    return image


def _stage(items, config: BuildConfig, build_id: str, work: str, fetched: bool = False) -> BuildSink:
    """Step 2: fetch, clean and hash the items (`fetched`: `ingest_batch` already ran on them); write the accepted
    rows (uncommitted), the rejects and the narrow keys. One data file per write task, one write task per block of
    items (blocks smaller than a batch are bundled): blocks of `rows_per_file` items keep every file, and every task
    that reads or rewrites one later, the same size however big the source."""
    staged = BuildSink(config.out, build_id, work)
    items = items.repartition(target_num_rows_per_block=max(rows_per_file(config.image.size), config.batch_size))
    if not fetched:
        items = items.map_batches(ingest_batch, fn_kwargs={"image": config.image, "fetch": config.fetch},
                                  batch_format="pyarrow", batch_size=config.batch_size)
    items.write_datasink(staged)
    return staged


def _dedupe(out: str, staged: BuildSink, work: str) -> tuple[Counter, dict[str, list]]:
    """Steps 3 and 4: which written rows are duplicates (a groupby on the content hash over the narrow keys, on
    the driver for a small build), then the data files that hold some rewritten without them. Returns the
    dropped rows by reason, and each rewritten file's new add actions."""

    written = sum(json.loads(a.stats)["numRecords"] for a in staged.actions)
    table_rows = row_count(open_table(out)) if table_exists(out) else 0
    if written <= LOCAL_DEDUPE_KEYS and table_rows <= LOCAL_DEDUPE_TABLE_ROWS:
        dropped = _dedupe_small(out, staged.keys, join(work, "drops"), table_rows > 0)
    else:
        dropped = _dedupe_in_ray(out, staged.keys, join(work, "drops"), written + table_rows, len(staged.actions))
    if not sum(dropped.values()):
        return dropped, {}
    rewrite = DedupeSink(out, metadata={})  # the build's files with nothing to drop are read as empty and kept
    folder_dataset(join(work, "drops"), pa.array([a.path for a in staged.actions], pa.string())) \
        .write_datasink(rewrite)
    return dropped, rewrite.replaced


def _commit(config: BuildConfig, actions: list, metadata: dict, build_id: str) -> int:
    """Step 5: one commit of every data file that has rows, with what made it; the new version."""
    if not table_exists(config.out):
        record_image_mode(config.out, "RGB" if config.image.background is not None else "RGBA")
    sink = CommitDeltaDatasink(config.out, schema=EMOJI_SCHEMA, metadata=metadata)
    sink.commit([a for a in actions if json.loads(a.stats)["numRecords"]])
    return version_for_build(config.out, build_id)


def ingest_dataset(items, config: BuildConfig, *, extra_metadata: dict | None = None,
                   start: float | None = None, fetched: bool = False) -> BuildSummary:
    """Steps 2-5 for a Ray Dataset of items (`ITEM_SCHEMA`; from `build_dataset`, or from the crawler), or with
    `fetched` of `ingest_batch`'s rows (the crawler fetches a new table's images while it reads pages)."""
    start = start or time.perf_counter()
    config = dataclasses.replace(config, image=image_config_for(config.out, config.image))
    ensure_ray()
    build_id = uuid.uuid4().hex[:12]
    work = join(config.out, SIDECAR, "builds", build_id)
    logger.info("build %s: %s -> %s", build_id, config.source, config.out)
    marks = [("ray", time.perf_counter())]  # the end of each phase since `start`
    staged = _stage(items, config, build_id, work, fetched)
    marks.append(("ingest", time.perf_counter()))
    dropped, replaced = _dedupe(config.out, staged, work) if staged.actions else (Counter(), {})
    marks.append(("dedupe", time.perf_counter()))
    actions = [a for a in staged.actions if a.path not in replaced] + [a for new in replaced.values() for a in new]
    rejected = dict(staged.rejected)
    counts = {
        "in": staged.counts["in"], "accepted": staged.counts["in"] - sum(rejected.values()), "rejected": rejected,
        "duplicates_in_build": dropped["duplicate_in_build"], "duplicates_in_table": dropped["duplicate_in_table"],
        "added": sum(json.loads(a.stats)["numRecords"] for a in actions), "alpha": dict(staged.alpha),
    }
    version = None
    if counts["added"]:
        version = _commit(config, actions, {
            "operation": "build", "source": config.source, "counts": counts,
            "config": _jsonable(dataclasses.asdict(config)), "code_version": code_version(),
            "message": config.message, "build_id": build_id, "rejects": staged.rejects,
            **_jsonable(extra_metadata or {})}, build_id)
    remove_run(work)
    marks.append(("commit", time.perf_counter()))
    logger.info("%s", phases_line(start, marks))
    return BuildSummary(
        out=config.out, version=version, images_in=counts["in"], accepted=counts["accepted"],
        rejected=rejected, duplicates_in_build=counts["duplicates_in_build"],
        duplicates_in_table=counts["duplicates_in_table"], added=counts["added"],
        seconds=time.perf_counter() - start, rejects_uri=staged.rejects if rejected else None,
        alpha=dict(staged.alpha),
    )


def phases_line(start: float, marks: list[tuple[str, float]]) -> str:
    """`phases (s): {...}`, the seconds of each phase (a mark is its name and end), as `-v` logs it for
    bench/ingest.py."""
    ends = [t for _, t in marks]
    return f"phases (s): { {name: round(t - before, 3) for (name, t), before in zip(marks, [start] + ends)} }"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
