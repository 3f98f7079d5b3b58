"""Ray Data task code of the ingest stage: fetch and clean one batch of source items.

Kept apart from `build.py` so Ray workers import only PIL, pyarrow and urllib3
(not deltalake or the Ray datasink), which keeps worker start-up short.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from emoji_ldm.ingest.images import Cleaned, ImageConfig, clean_image
from emoji_ldm.sources.base import FetchConfig, FetchError, fetch_bytes, make_pool
from emoji_ldm.store.schema import EMOJI_SCHEMA

# Columns only the build uses; dropped before the write. `_group` is what de-duplication groups by: the
# content hash, or "reject:<locator>" for a rejected item; `_from_table` marks an id already in the table.
WORK_SCHEMA = EMOJI_SCHEMA.append(pa.field("_reason", pa.string())).append(
    pa.field("_detail", pa.string())).append(pa.field("_group", pa.string())).append(
    pa.field("_from_table", pa.bool_()))


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
            "_from_table": False,
        }
        reject = {**out, "_group": f"reject:{row['locator']}"}
        try:
            data = fetch_bytes(row["locator"], fetch, pool=pool)
        except FetchError as e:
            return {**reject, "_reason": e.reason, "_detail": e.detail}
        result = clean_image(data, image)
        if not isinstance(result, Cleaned):
            return {**reject, "_reason": result.reason, "_detail": result.detail}
        return {
            **out, "id": result.id, "_group": result.id, "image": result.png, "width": result.width,
            "height": result.height,
            "orig_width": result.orig_width, "orig_height": result.orig_height, "orig_format": result.orig_format,
        }

    if remote:
        with ThreadPoolExecutor(max_workers=fetch.threads) as threads:
            results = list(threads.map(one, rows))
        pool.clear()
    else:
        results = [one(r) for r in rows]
    return pa.Table.from_pylist(results, schema=WORK_SCHEMA)


def table_id_rows(batch: pa.Table) -> pa.Table:
    """Ray Data task: ids already in the table -> `WORK_SCHEMA` rows that only mark their group."""
    n = batch.num_rows
    columns = {name: pa.nulls(n, field.type) for name, field in zip(WORK_SCHEMA.names, WORK_SCHEMA)}
    columns.update(id=batch.column("id"), _group=batch.column("id"), _from_table=pa.array([True] * n))
    return pa.table(columns, schema=WORK_SCHEMA)


def resolve_group(group: pa.Table) -> pa.Table:
    """Ray Data task (one `_group`): keep the first new row of a content hash, mark the others.

    A hash already in the table marks every new row `duplicate_in_table`; otherwise the row with the
    smallest source URL is kept and the rest are `duplicate_in_build`. Marked duplicates lose their
    pixels (they are only counted). Rejected items pass through as they are.
    """
    import pyarrow.compute as pc

    new = group.filter(pc.invert(group.column("_from_table")))
    if new.num_rows == 0 or new.column("id").null_count == new.num_rows:
        return new
    in_table = new.num_rows < group.num_rows
    new = new.sort_by([("source_url", "ascending"), ("page_url", "ascending")])
    reasons = ["duplicate_in_table" if in_table else ("duplicate_in_build" if i else None)
               for i in range(new.num_rows)]
    reason = pa.array(reasons, pa.string())
    new = new.set_column(new.schema.get_field_index("_reason"), "_reason", reason)
    image = pc.if_else(pc.is_null(reason), new.column("image"), pa.scalar(None, pa.binary()))
    return new.set_column(new.schema.get_field_index("image"), "image", image)
