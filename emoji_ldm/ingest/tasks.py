"""Ray Data task code of the ingest stage: fetch and clean one batch of source items.

Kept apart from `build.py` so Ray workers import only PIL, pyarrow and urllib3
(not deltalake or the Ray datasink), which keeps worker start-up short.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from emoji_ldm.imaging import Cleaned, ImageConfig, clean_image
from emoji_ldm.sources.base import FetchConfig, FetchError, fetch_bytes, make_pool
from emoji_ldm.store.schema import EMOJI_SCHEMA

# Columns only the build uses; dropped before the write.
WORK_SCHEMA = EMOJI_SCHEMA.append(pa.field("_reason", pa.string())).append(pa.field("_detail", pa.string())) \
    .append(pa.field("_alpha", pa.string()))  # a kept row: what happened to its alpha (ALPHA_KINDS)


def ingest_batch(batch: pa.Table, image: ImageConfig, fetch: FetchConfig) -> pa.Table:
    """Ray Data task: fetch and clean one batch of source items.

    In: `ITEM_SCHEMA` columns (locator, source, source_url, page_url, title, tag, caption).
    Out: `WORK_SCHEMA` rows; rejected rows have a null `id`/`image` and a `_reason`.
    """
    rows = batch.to_pylist()
    remote = any(r["locator"].startswith(("http://", "https://")) for r in rows)
    pool = make_pool(fetch) if remote else None
    now = dt.datetime.now(dt.timezone.utc)

    def one(row: dict) -> dict:
        caption = row.get("caption") or None
        out = {
            "source": row["source"], "source_url": row.get("source_url") or row["locator"],
            "page_url": row.get("page_url"), "title": row.get("title") or "", "tag": row.get("tag") or "",
            "caption": caption, "caption_model": "source" if caption else None, "ingested_at": now,
        }
        try:
            data = fetch_bytes(row["locator"], fetch, pool=pool)
        except FetchError as e:
            return {**out, "_reason": e.reason, "_detail": e.detail}
        result = clean_image(data, image)
        if not isinstance(result, Cleaned):
            return {**out, "_reason": result.reason, "_detail": result.detail}
        return {
            **out, "id": result.id, "image": result.png, "width": result.width,
            "height": result.height,
            "orig_width": result.orig_width, "orig_height": result.orig_height, "orig_format": result.orig_format,
            "_alpha": result.alpha,
        }

    if remote:
        with ThreadPoolExecutor(max_workers=fetch.threads) as threads:
            results = list(threads.map(one, rows))
        pool.clear()
    else:
        results = [one(r) for r in rows]
    return pa.Table.from_pylist(results, schema=WORK_SCHEMA)


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
