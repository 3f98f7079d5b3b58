"""What keeps ingest and crawl fast, without Ray or a browser: the per-phase line bench/ingest.py reads, download
connections kept from one batch to the next, and a shard's pages read a few at a time (a fake WebDriver)."""

from __future__ import annotations

import re
import time

import pyarrow as pa

from emoji_ldm.crawl.profiles import SiteProfile


def test_the_phases_line_is_what_the_ingest_benchmark_parses():
    import ast

    from emoji_ldm.ingest.build import phases_line

    line = phases_line(10.0, [("ray", 11.5), ("ingest", 20.0), ("dedupe", 20.5), ("commit", 20.625)])
    m = re.search(r"phases \(s\): (\{.*\})", line)  # bench/ingest.py's pattern
    assert m and ast.literal_eval(m.group(1)) == {"ray": 1.5, "ingest": 8.5, "dedupe": 0.5, "commit": 0.125}


def test_downloads_keep_their_connection_pool_from_one_batch_to_the_next(monkeypatch):
    """A pool per batch (closed after it) opens new connections for every batch; one per worker process keeps
    them (keep-alive)."""
    import io

    from PIL import Image

    import emoji_ldm.ingest.tasks as tasks
    from emoji_ldm.imaging import ImageConfig
    from emoji_ldm.sources.base import ITEM_SCHEMA, FetchConfig

    png = io.BytesIO()
    Image.new("RGBA", (8, 8), (200, 0, 0, 255)).save(png, format="PNG")
    pools = []

    class Pool:
        def clear(self):
            pass

    monkeypatch.setattr(tasks, "make_pool", lambda fetch: pools.append(Pool()) or pools[-1])
    monkeypatch.setattr(tasks, "fetch_bytes", lambda locator, fetch, pool: png.getvalue())
    fetch = FetchConfig(threads=2, per_host=2, timeout_s=7.5)  # a config no other test uses: a fresh pool
    for batch in range(3):
        urls = [f"http://127.0.0.1:9/{batch}-{i}.png" for i in range(2)]
        items = pa.table({"locator": urls, "source": ["urls:x"] * 2, "source_url": urls, "page_url": [None] * 2,
                          "title": [""] * 2, "tag": [""] * 2, "caption": [None] * 2}, schema=ITEM_SCHEMA)
        out = tasks.ingest_batch(items, ImageConfig(size=8), fetch)
        assert out.column("_reason").null_count == 2 and out.column("id").null_count == 0
    assert len(pools) == 1, f"3 batches made {len(pools)} connection pools"


class FakeDriver:
    """Enough of a Selenium driver for PageReader: each page renders at once, its items arrive `delay_s` after
    it is loaded, in one go; page `empty` has none. Records the loads."""

    def __init__(self, delay_s: float, empty: int):
        self.delay_s, self.empty, self.loads = delay_s, empty, []
        self.window_handles, self.current = ["t0"], "t0"
        self.loaded: dict[str, tuple[int, float]] = {}
        driver = self

        class SwitchTo:
            def window(self, handle):
                driver.current = handle

            def new_window(self, kind):
                driver.window_handles.append(f"t{len(driver.window_handles)}")
                driver.current = driver.window_handles[-1]

        self.switch_to = SwitchTo()

    @property
    def current_window_handle(self) -> str:
        return self.current

    def get(self, url: str) -> None:
        page = int(url.rsplit("=", 1)[1])
        self.loads.append(page)
        self.loaded[self.current] = (page, time.monotonic())

    def _items(self) -> list:
        page, at = self.loaded[self.current]
        if page >= self.empty or time.monotonic() - at < self.delay_s:
            return []
        return [[f"/img/{page}-{i}.png", f"t{i}"] for i in range(3)]

    def find_element(self, by, selector):  # WebDriverWait's presence check: always rendered
        return object()

    def execute_script(self, script: str, *args):
        items = self._items()
        if "readyState" in script:
            return ["complete", len(items), False, True, items][:len(args) - 1]
        return items

    def execute_async_script(self, script: str, *args):  # the reading once items show, or after args[6] ms
        deadline = time.monotonic() + args[6] / 1000
        while not self._items() and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.execute_script(script, *args[:6])


class FakeState:
    """A CrawlState in this process: `state.take.remote()` answers at once (ray.get is patched to return its
    argument)."""

    def __init__(self, shards: list[dict] = ()):
        from emoji_ldm.crawl.shards import CrawlState

        self.real = CrawlState(None, list(shards))
        for name in ("end", "empty_at", "take", "finished"):
            setattr(self, name, type("Method", (), {"remote": staticmethod(getattr(self.real, name))})())


def test_a_shard_reads_its_pages_a_few_at_a_time_and_none_past_the_empty_one(monkeypatch):
    import ray

    from emoji_ldm.crawl.page_reader import PageReader

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    profile = SiteProfile(name="t", url="http://h/{tag}?page={page}", wait_for="main", item="div", image="img",
                          settle_s=0.5, items_settle_s=0.3, page_timeout_s=5)
    reader = PageReader(profile, "Blobs", "/unused", 1, FakeState(), min_interval_s=0, retries=0, backoff_s=0)
    driver = FakeDriver(delay_s=0.1, empty=6)
    reader.browser = type("B", (), {"driver": driver, "quit": lambda self: None})()
    start = time.monotonic()
    shard, complete = reader.crawl_shard([1, 2, 3, 4, 5, 6, 7, 8])
    seconds = time.monotonic() - start
    assert complete and [p["status"] for p in shard["pages"]] == ["ok"] * 5 + ["empty"]
    assert all(len(p["items"]) == 3 for p in shard["pages"][:5])
    assert sorted(driver.loads) == [1, 2, 3, 4, 5, 6]  # each page once, nothing past the empty page
    # one by one: 5 x (0.1 s to the items + 0.3 s settle) + 0.5 s for the empty page = 2.5 s at least
    assert seconds < 1.9, f"{seconds:.1f} s for 6 pages: read one at a time"


def test_a_reader_holding_two_calls_reads_the_shards_in_page_order(monkeypatch, tmp_path):
    """Ray Data hands a page reader two calls at once (one reads pages while the other finishes its downloads).
    The call that gets the browser reads the first shard not started (`CrawlState.take`), not the row it was handed:
    here the call of the second row gets it first, and the pages still load in order."""
    import threading

    import ray

    from emoji_ldm.crawl.page_reader import PageReader

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    profile = SiteProfile(name="t", url="http://h/{tag}?page={page}", wait_for="main", item="div", image="img",
                          settle_s=0.3, items_settle_s=0.1, page_timeout_s=5)
    state = FakeState([{"first": 1, "last": 3, "resumed": False}, {"first": 4, "last": 6, "resumed": False}])
    reader = PageReader(profile, "Blobs", str(tmp_path), 1, state, min_interval_s=0, retries=0, backoff_s=0)
    driver = FakeDriver(delay_s=0.05, empty=6)
    reader.browser = type("B", (), {"driver": driver, "quit": lambda self: None})()
    rows = {}

    def call(row: int) -> None:
        rows[row] = reader(pa.table({"id": [row]}))

    second = threading.Thread(target=call, args=(1,))
    second.start()
    while not reader.reading.locked():  # the second row's call holds the browser
        time.sleep(0.005)
    first = threading.Thread(target=call, args=(0,))
    first.start()
    second.join(10)
    first.join(10)
    assert driver.loads == [1, 2, 3, 4, 5, 6]  # in page order, each once
    assert sorted(rows[1].column("page").to_pylist()) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert sorted(rows[0].column("page").to_pylist()) == [4, 4, 4, 5, 5, 5]  # page 6 is the empty one
    assert [r["first"] for r in state.real.records] == [1, 4] and not state.real.todo
