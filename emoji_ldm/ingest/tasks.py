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

# Columns only the build uses; dropped before the write.
_WORK_SCHEMA = EMOJI_SCHEMA.append(pa.field("_key", pa.int64())).append(
    pa.field("_reason", pa.string())
).append(pa.field("_detail", pa.string()))


def ingest_batch(batch: pa.Table, image: ImageConfig, fetch: FetchConfig) -> pa.Table:
    """Ray Data task: fetch and clean one batch of source items.

    In: columns key, locator, source, source_url, title, tag, caption.
    Out: `_WORK_SCHEMA` rows; rejected rows have a null `id`/`image` and a `_reason`.
    """
    rows = batch.to_pylist()
    remote = any(r["locator"].startswith(("http://", "https://")) for r in rows)
    pool = make_pool(fetch) if remote else None
    now = dt.datetime.now(dt.timezone.utc)

    def one(row: dict) -> dict:
        out = {
            "_key": row["key"], "source": row["source"], "source_url": row["source_url"],
            "page_url": row.get("page_url"),
            "title": row["title"], "tag": row["tag"], "caption": row["caption"],
            "caption_model": "source" if row["caption"] else None, "ingested_at": now,
        }
        try:
            data = fetch_bytes(row["locator"], fetch, pool=pool)
        except FetchError as e:
            return {**out, "_reason": e.reason, "_detail": e.detail}
        result = clean_image(data, image)
        if not isinstance(result, Cleaned):
            return {**out, "_reason": result.reason, "_detail": result.detail}
        return {
            **out, "id": result.id, "image": result.png, "width": result.width, "height": result.height,
            "orig_width": result.orig_width, "orig_height": result.orig_height, "orig_format": result.orig_format,
        }

    if remote:
        with ThreadPoolExecutor(max_workers=fetch.threads) as threads:
            results = list(threads.map(one, rows))
        pool.clear()
    else:
        results = [one(r) for r in rows]
    return pa.Table.from_pylist(results, schema=_WORK_SCHEMA)
