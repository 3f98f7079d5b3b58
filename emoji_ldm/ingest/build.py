"""`build_dataset`: source -> Ray Data (fetch, decode, clean, hash) -> one new Delta version.

Stages:
  1. list the source on the driver (paths or URLs + metadata);
  2. `ingest_batch` in Ray Data tasks: read or download the bytes (threads,
     timeouts, retries, per-host limit), clean with `clean_image`, hash;
  3. on the driver, from the ids only: drop duplicates within the build and
     against every row already in the table, collect rejections by reason;
  4. write the kept rows with one Delta commit that records operation, source,
     counts, config and code version; rejections go to a sidecar Parquet.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.errors import UserError
from emoji_ldm.ingest.images import ImageConfig
from emoji_ldm.ingest.tasks import ingest_batch
from emoji_ldm.options import opt
from emoji_ldm.runtime import ensure_ray
from emoji_ldm.sources import FetchConfig, list_source
from emoji_ldm.store.delta import (
    CommitDeltaDatasink,
    read_ids,
    version_for_build,
    write_rejects,
)
from emoji_ldm.store.schema import EMOJI_SCHEMA
from emoji_ldm.store.uri import check_s3_bucket, normalize_uri
from emoji_ldm.version import code_version

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class BuildConfig:
    source: str = opt(help="twemoji | dir:PATH | urls:FILE (.txt, .csv or .parquet)")
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


def _keep_rows(batch: pa.Table, keep: np.ndarray) -> pa.Table:
    mask = pc.is_in(batch.column("_key"), value_set=pa.array(keep, type=pa.int64()))
    return batch.filter(mask).select(EMOJI_SCHEMA.names)


def _decide(meta: pa.Table, existing: set[str]) -> tuple[np.ndarray, Counter, int, int, pa.Table]:
    """From (key, id, reason, ...) rows: keys to keep, reject counts, duplicate counts, rejects table."""
    meta = meta.sort_by("_key")
    keys = meta.column("_key").to_pylist()
    ids = meta.column("id").to_pylist()
    reasons = meta.column("_reason").to_pylist()
    seen: set[str] = set()
    keep, dup_build, dup_table = [], 0, 0
    rejected: Counter = Counter()
    for key, id_, reason in zip(keys, ids, reasons):
        if reason is not None:
            rejected[reason] += 1
        elif id_ in existing:
            dup_table += 1
        elif id_ in seen:
            dup_build += 1
        else:
            seen.add(id_)
            keep.append(key)
    rejects = meta.filter(pc.is_valid(meta.column("_reason"))).select(["source_url", "_reason", "_detail"])
    rejects = rejects.rename_columns(["source_url", "reason", "detail"])
    return np.asarray(keep, dtype=np.int64), rejected, dup_build, dup_table, rejects


def build_dataset(config: BuildConfig) -> BuildSummary:
    """Build (or append to) the dataset at `config.out` from `config.source`: one new version."""
    start = time.perf_counter()
    check_s3_bucket(config.out)
    items = list_source(config.source, config.limit)
    return ingest_items(items, config, start=start)


def ingest_items(items: list, config: BuildConfig, extra_metadata: dict | None = None,
                 start: float | None = None) -> BuildSummary:
    """Stages 2-4 for items already listed (by `build_dataset`, or by the crawler)."""
    import ray.data

    start = start or time.perf_counter()
    phases: dict[str, float] = {}
    last = start

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        phases[name] = round(now - last, 3)
        last = now

    existing = read_ids(config.out)  # also fails early on an unreadable table
    lap("list")
    if not items:
        return BuildSummary(out=config.out, version=None, images_in=0, accepted=0, rejected={},
                            duplicates_in_build=0, duplicates_in_table=0, added=0,
                            seconds=time.perf_counter() - start, phases=phases)
    ensure_ray()
    lap("ray_start")
    build_id = uuid.uuid4().hex[:12]
    logger.info("build %s: %d items from %s -> %s", build_id, len(items), config.source, config.out)

    rows = [item.to_row(i) for i, item in enumerate(items)]
    n_blocks = max(1, min(len(rows) // config.batch_size + 1, 64))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        ingest_batch,
        fn_kwargs={"image": config.image, "fetch": config.fetch},
        batch_format="pyarrow",
        batch_size=config.batch_size,
    ).materialize()
    lap("ingest")

    meta = pa.concat_tables(
        ray.get(ds.select_columns(["_key", "id", "_reason", "_detail", "source_url"]).to_arrow_refs())
    )
    keep, rejected, dup_build, dup_table, rejects = _decide(meta, existing)
    accepted = len(rows) - sum(rejected.values())
    counts = {
        "in": len(rows), "accepted": accepted, "rejected": dict(rejected),
        "duplicates_in_build": dup_build, "duplicates_in_table": dup_table, "added": int(len(keep)),
    }
    rejects_uri = write_rejects(config.out, build_id, rejects)
    version = None
    if len(keep):
        metadata = {
            "operation": "build",
            "source": config.source,
            "counts": counts,
            "config": _jsonable(dataclasses.asdict(config)),
            "code_version": code_version(),
            "message": config.message,
            "build_id": build_id,
            "rejects": rejects_uri,
            **_jsonable(extra_metadata or {}),
        }
        sink = CommitDeltaDatasink(config.out, schema=EMOJI_SCHEMA, metadata=metadata)
        ds.map_batches(_keep_rows, fn_kwargs={"keep": keep}, batch_format="pyarrow").write_datasink(sink)
        version = version_for_build(config.out, build_id)
    lap("write")
    logger.info("build %s phases (s): %s", build_id, phases)
    return BuildSummary(
        out=config.out, version=version, images_in=len(rows), accepted=accepted, rejected=dict(rejected),
        duplicates_in_build=dup_build, duplicates_in_table=dup_table, added=int(len(keep)),
        seconds=time.perf_counter() - start, rejects_uri=rejects_uri, phases=phases,
    )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
