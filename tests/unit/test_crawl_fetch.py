"""A new table's crawl downloads each shard's images while its pages are read (`ShardFetch`, in the page reader),
without Ray or a browser: each image URL once per shard, from its lowest page, the page kept for the tag-end filter,
which then gives the same rows as filtering the items first."""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from emoji_ldm.crawl.page_reader import ITEM_SCHEMA
from emoji_ldm.imaging import ImageConfig
from emoji_ldm.sources.base import FetchConfig


def _items(page: int, names: list[str]) -> pa.Table:
    rows = [{"locator": f"http://127.0.0.1:9/img/{n}.png", "source": "crawl:t/Blobs", "source_url": None,
             "page_url": f"http://127.0.0.1:9/tag/Blobs?page={page}", "title": n, "tag": "Blobs", "caption": None,
             "page": page} for n in names]
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (color, 0, 0, 255)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_shard_fetches_each_url_once_from_its_lowest_page_and_the_tag_end_filter_agrees(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from emoji_ldm.crawl.shards import ShardFetch, fetched_schema, tag_end_filter
    from emoji_ldm.ingest import tasks

    fetched = []
    monkeypatch.setattr(tasks, "fetch_bytes", lambda url, fetch, pool: fetched.append(url) or _png(len(url)))
    pool = ThreadPoolExecutor(1)  # the page reader's: one for all its shards
    config = (ImageConfig(size=8), FetchConfig(threads=2, per_host=2, timeout_s=3.25))
    shard = ShardFetch(*config, pool=pool)
    pages = {11: ["a", "b", "a"], 12: ["c", "b"], 13: ["d"]}  # "a" twice on its page, "b" again on the next
    for page, names in pages.items():
        shard.add(_items(page, names))
    rows = shard.table()
    assert rows.schema == fetched_schema() and "page" in rows.column_names
    assert sorted(fetched) == [f"http://127.0.0.1:9/img/{n}.png" for n in "abcd"]  # each URL downloaded once
    assert {(r["title"], r["page"]) for r in rows.to_pylist()} == {("a", 11), ("b", 11), ("c", 12), ("d", 13)}
    assert rows.column("_reason").null_count == rows.num_rows  # every image decoded and kept

    # after the all-to-all: the same rows (page URL per image) as the tag-end filter on the items themselves
    items = pa.concat_tables([_items(p, n) for p, n in pages.items()])
    for end in (None, 12):
        kept = tag_end_filter(rows, end, key="source_url")
        want = tag_end_filter(items, end)
        assert sorted(zip(kept.column("source_url").to_pylist(), kept.column("page_url").to_pylist())) == \
            sorted(zip(want.column("locator").to_pylist(), want.column("page_url").to_pylist()))
        assert "page" not in kept.column_names

    # the next shard starts afresh: its "a" is fetched again (the all-to-all keeps the lowest page's row)
    shard = ShardFetch(*config, pool=pool)
    shard.add(_items(16, ["a"]))
    assert shard.table().column("page").to_pylist() == [16] and fetched.count("http://127.0.0.1:9/img/a.png") == 2
    empty = ShardFetch(*config, pool=pool).table()  # a shard without items
    assert empty.num_rows == 0 and empty.schema == fetched_schema()
    pool.shutdown()
