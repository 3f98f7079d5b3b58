"""Ray Data task code of the ingest stage: fetch and clean one batch of source items.

Kept apart from `build.py` so Ray workers import only PIL, pyarrow and urllib3
(not deltalake or the Ray datasink), which keeps worker start-up short.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.imaging import Cleaned, ImageConfig, clean_image
from emoji_ldm.sources.base import FetchConfig, FetchError, fetch_bytes, make_pool
from emoji_ldm.store.schema import EMOJI_SCHEMA

# Columns only the build uses; dropped before the write.
WORK_SCHEMA = EMOJI_SCHEMA.append(pa.field("_reason", pa.string())).append(pa.field("_detail", pa.string())) \
    .append(pa.field("_alpha", pa.string()))  # a kept row: what happened to its alpha (ALPHA_KINDS)


# Per worker process, kept between batches: the connection pools (a keep-alive connection serves the next
# batch too) and the download threads (no thread start-up per batch).
_POOLS: dict[FetchConfig, object] = {}
_THREADS: dict[int, ThreadPoolExecutor] = {}


def _pool(fetch: FetchConfig):
    if fetch not in _POOLS:
        _POOLS[fetch] = make_pool(fetch)
    return _POOLS[fetch]


def _threads(n: int) -> ThreadPoolExecutor:
    if n not in _THREADS:
        _THREADS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ingest")
    return _THREADS[n]


def _clean_one(locator: str, image: ImageConfig, fetch: FetchConfig, pool) -> Cleaned | tuple[str, str]:
    """One item's bytes fetched and cleaned: `Cleaned`, or (reason, detail)."""
    try:
        data = fetch_bytes(locator, fetch, pool=pool)
    except FetchError as e:
        return e.reason, e.detail
    result = clean_image(data, image)
    return result if isinstance(result, Cleaned) else (result.reason, result.detail)


def _column(batch: pa.Table, name: str) -> pa.ChunkedArray | pa.Array:
    return batch.column(name) if name in batch.column_names else pa.nulls(batch.num_rows, pa.string())


def ingest_batch(batch: pa.Table, image: ImageConfig, fetch: FetchConfig) -> pa.Table:
    """Ray Data task: fetch and clean one batch of source items.

    In: `ITEM_SCHEMA` columns (locator, source, source_url, page_url, title, tag, caption).
    Out: `WORK_SCHEMA` rows; rejected rows have a null `id`/`image` and a `_reason`. The item's own columns
    pass through as Arrow; only the cleaned images' fields are built per row.
    """
    n = batch.num_rows
    locators = batch.column("locator").to_pylist()
    remote = any(loc.startswith(("http://", "https://")) for loc in locators)
    pool = _pool(fetch) if remote else None
    if remote:
        results = list(_threads(fetch.threads).map(lambda loc: _clean_one(loc, image, fetch, pool), locators))
    else:
        results = [_clean_one(loc, image, fetch, None) for loc in locators]
    kept = [r if isinstance(r, Cleaned) else None for r in results]
    failed = [None if isinstance(r, Cleaned) else r for r in results]

    def field(get, kind: pa.DataType, rows=kept) -> pa.Array:
        return pa.array([None if r is None else get(r) for r in rows], kind)

    source_url = _column(batch, "source_url")
    caption = _column(batch, "caption")
    caption = pc.if_else(pc.equal(caption, ""), pa.nulls(n, pa.string()), caption)  # "" is no caption
    columns = {
        "id": field(lambda r: r.id, pa.string()), "image": field(lambda r: r.png, pa.binary()),
        "width": field(lambda r: r.width, pa.int32()), "height": field(lambda r: r.height, pa.int32()),
        "orig_width": field(lambda r: r.orig_width, pa.int32()),
        "orig_height": field(lambda r: r.orig_height, pa.int32()),
        "orig_format": field(lambda r: r.orig_format, pa.string()),
        "source": _column(batch, "source"),
        "source_url": pc.if_else(pc.fill_null(pc.equal(source_url, ""), True), batch.column("locator"), source_url),
        "page_url": _column(batch, "page_url"), "title": pc.fill_null(_column(batch, "title"), ""),
        "tag": pc.fill_null(_column(batch, "tag"), ""), "caption": caption,
        "caption_model": pc.if_else(pc.is_valid(caption), "source", pa.nulls(n, pa.string())),
        "caption_prompt_id": pa.nulls(n, pa.string()),
        "ingested_at": pa.repeat(pa.scalar(dt.datetime.now(dt.timezone.utc), WORK_SCHEMA.field("ingested_at").type), n),
        "_reason": field(lambda r: r[0], pa.string(), failed), "_detail": field(lambda r: r[1], pa.string(), failed),
        "_alpha": field(lambda r: r.alpha, pa.string()),
    }
    return pa.table({f.name: columns[f.name] for f in WORK_SCHEMA}, schema=WORK_SCHEMA)


# The narrow rows de-duplication shuffles: where each written row is (data file, row position).
KEY_SCHEMA = pa.schema([("id", pa.string()), ("source_url", pa.string()), ("page_url", pa.string()),
                        ("_file", pa.string()), ("_pos", pa.int64()), ("_from_table", pa.bool_())])
DROP_SCHEMA = pa.schema([("_file", pa.string()), ("_pos", pa.int64()), ("_reason", pa.string())])


def table_key_rows(batch: pa.Table) -> pa.Table:
    """Ray Data task: ids already in the table -> `KEY_SCHEMA` rows that only mark their id as taken."""
    n = batch.num_rows
    return pa.table({"id": batch.column("id"), "source_url": pa.nulls(n, pa.string()),
                     "page_url": pa.nulls(n, pa.string()), "_file": pa.nulls(n, pa.string()),
                     "_pos": pa.nulls(n, pa.int64()), "_from_table": pa.array([True] * n)}, schema=KEY_SCHEMA)


def resolve_group(group: pa.Table) -> pa.Table:
    """Ray Data task (the key rows of one content hash): the written rows to drop, with why.

    A hash already in the table drops every new row (`duplicate_in_table`); otherwise the row with the
    smallest source URL stays and the rest are `duplicate_in_build`. Out: `DROP_SCHEMA` rows.
    """
    import pyarrow.compute as pc

    if group.num_rows == 0:
        return DROP_SCHEMA.empty_table()
    new = group.filter(pc.invert(group.column("_from_table")))
    in_table = new.num_rows < group.num_rows
    if in_table:
        drop, reason = new, "duplicate_in_table"
    else:
        drop = new.sort_by([("source_url", "ascending"), ("page_url", "ascending")]).slice(1)
        reason = "duplicate_in_build"
    return pa.table({"_file": drop.column("_file"), "_pos": drop.column("_pos"),
                     "_reason": pa.array([reason] * drop.num_rows, pa.string())}, schema=DROP_SCHEMA)
