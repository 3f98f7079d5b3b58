"""A crawl's shards: the shared tag-end state, each shard's stats file (what marks it done for a re-run), the
driver's shard lines and totals, and the tag-end filter (the module docstring of crawler.py has the rule)."""

from __future__ import annotations

import logging
import threading
import time

import pyarrow as pa

logger = logging.getLogger(__name__)

FEW_PAGES = 3  # fewer pages with items than this, out of a longer range, is worth a warning


class CrawlState:
    """A small Ray actor shared by the page readers and the tag-end filter: the shards not started yet, in page
    order, the tag's end so far (the smallest empty page), the shards still to finish, and each finished shard's
    summary for the driver."""

    def __init__(self, end: int | None, shards: list[dict]):
        from collections import deque

        self._end = end
        self.queue = deque(shards)  # {first, last, resumed}
        self.todo = {s["first"] for s in shards}  # first pages of the shards still to finish
        self.records: list[dict] = []

    def take(self) -> dict:
        """The next shard to read: the one of the lowest pages not started yet (a reader takes one when its
        browser is free, so the readers go through the pages in order whatever Ray Data queued where)."""
        return self.queue.popleft()

    def end(self) -> int | None:
        return self._end

    def empty_at(self, page: int) -> int:
        self._end = page if self._end is None else min(self._end, page)
        return self._end

    def finished(self, first: int, record: dict | None) -> None:
        """A shard is done; its record (None for a shard done in an earlier run: the driver has it)."""
        if first in self.todo:
            self.todo.discard(first)
            if record is not None:
                self.records.append(record)

    def snapshot(self) -> tuple[int | None, int]:
        return self._end, len(self.todo)

    def records_since(self, n: int) -> list[dict]:
        return self.records[n:]


def shard_summary(shard: dict, *, resumed: bool, complete: bool = True) -> dict:
    """A shard's stats without its items: what the driver prints and totals (bounded by the shard's pages)."""
    return {"first": shard["first"], "last": shard["last"], "seconds": shard["seconds"], "resumed": resumed,
            "complete": complete, "browser_restarts": shard.get("browser_restarts", 0), "finished_at": time.time(),
            "pages": [{"page": p["page"], "url": p["url"], "status": p["status"], "items": len(p["items"]),
                       "error": p["error"], "seconds": p.get("seconds")} for p in shard["pages"]]}


def shard_line(r: dict) -> str:
    ok = sum(p["status"] == "ok" for p in r["pages"])
    failed = sum(p["status"] == "failed" for p in r["pages"])
    empties = [p["page"] for p in r["pages"] if p["status"] == "empty"]
    if not r["pages"] and not r["complete"]:
        return f"crawl: shard pages {r['first']}-{r['last']}: skipped, past the tag's end"
    return (f"crawl: shard pages {r['first']}-{r['last']}: {ok} ok, {failed} failed"
            + (f", empty at {empties[0]}" if empties else "")
            + ("" if r["complete"] else ", stopped at the tag's end")
            + f", {sum(p['items'] for p in r['pages'])} items"
            + (" (done in an earlier run)" if r["resumed"] else f", {r['seconds']:.1f} s"))


def after_pages(batch: pa.Table, state, key: str = "locator") -> pa.Table:
    """Runs after an all-to-all operator keyed on the image URL (`key`: locator, or source_url for fetched rows):
    drops pages past the tag's end, keeps one row per image URL (its lowest page), and the columns
    `ingest_dataset` takes."""
    import ray

    end, todo = ray.get(state.snapshot.remote())
    if todo:
        raise RuntimeError(f"the tag-end filter ran while {todo} page shard(s) were still running; it must follow "
                           "an all-to-all operator (join or repartition) on the page stage's output")
    return tag_end_filter(batch, end, key)


def tag_end_filter(batch: pa.Table, end: int | None, key: str = "locator") -> pa.Table:
    """Rows of pages up to `end`, one per image URL (`key`; the lowest page), without the `page` column."""
    import pyarrow.compute as pc

    if end is not None:
        batch = batch.filter(pc.less_equal(batch.column("page"), end))
    return first_per_url(batch, key).drop_columns(["page"])


def first_per_url(batch: pa.Table, key: str = "locator") -> pa.Table:
    """One row per image URL (`key`), the one of the lowest page; sorted by URL."""
    import pyarrow.compute as pc

    if batch.num_rows > 1:
        batch = batch.sort_by([(key, "ascending"), ("page", "ascending")])
        loc = batch.column(key).combine_chunks()
        first = pc.fill_null(pc.not_equal(loc.slice(1), loc.slice(0, len(loc) - 1)), True)
        batch = batch.filter(pa.concat_arrays([pa.array([True]), first]))
    return batch


def fetched_schema() -> pa.Schema:
    """The rows of `ShardFetch`: the build's `ingest_batch` rows, and the page."""
    from emoji_ldm.ingest.tasks import WORK_SCHEMA

    return WORK_SCHEMA.append(pa.field("page", pa.int64()))


class ShardFetch:
    """A shard's images downloaded and cleaned (the build's `ingest_batch`) page by page, on `pool` (a thread of
    the page reader), while its next pages load: each image URL once in the shard (pages come in order: its lowest
    page). The rows keep the page for the tag-end filter, which still decides after the all-to-all which are kept.
    Holds the shard's rows until `table` hands them over."""

    def __init__(self, image, fetch, pool):
        self.image, self.fetch, self.pool = image, fetch, pool
        self.seen, self.futures = set(), []

    def add(self, items: pa.Table) -> None:
        """Start on one page's item rows (`ITEM_SCHEMA`, with the page)."""
        import pyarrow.compute as pc

        new = items.filter(pc.invert(pc.is_in(items.column("locator"), value_set=pa.array(self.seen, pa.string()))))
        new = first_per_url(new)
        self.seen.update(new.column("locator").to_pylist())
        if new.num_rows:
            self.futures.append(self.pool.submit(self._fetch, new))

    def _fetch(self, items: pa.Table) -> pa.Table:
        from emoji_ldm.crawl.guard import may_fetch
        from emoji_ldm.ingest.tasks import ingest_batch

        allowed = [may_fetch(u, p) for u, p in zip(items.column("locator").to_pylist(),
                                                   items.column("page_url").to_pylist())]
        if not all(allowed):  # an image URL that names an internal address or a file: never fetched (guard.py)
            logger.warning("crawl: %d image URL(s) of a page name no public address; not fetched",
                           allowed.count(False))
            items = items.filter(pa.array(allowed))

        rows = ingest_batch(items.drop_columns(["page"]), self.image, self.fetch)
        return rows.append_column("page", items.column("page"))

    def table(self) -> pa.Table:
        """The shard's fetched rows, once the last page's are done."""
        tables = [f.result() for f in self.futures]
        return pa.concat_tables(tables) if tables else fetched_schema().empty_table()


def shard_uri(out: str, profile: str, tag: str, first: int, last: int) -> str:
    from emoji_ldm.store.uri import join

    return join(stats_dir(out, profile, tag), f"shard-{first:05d}-{last:05d}.json")


def stats_dir(out: str, profile: str, tag: str) -> str:
    from emoji_ldm.store.uri import join

    safe_tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)
    return join(out, "_emoji_ldm", "crawl", profile, safe_tag)


def done_shard(out: str, profile: str, tag: str, shard: list[int]) -> dict | None:
    """A shard's recorded result when it finished without failed pages (then it is not crawled again)."""
    from emoji_ldm.store.artifacts import exists, read_json

    uri = shard_uri(out, profile, tag, shard[0], shard[-1])
    if not exists(uri):
        return None
    result = read_json(uri)
    return result if not any(p["status"] == "failed" for p in result["pages"]) else None


class ShardPrinter(threading.Thread):
    """Prints each shard's line on the driver as the shard finishes (from `CrawlState`)."""

    def __init__(self, state, on_first=None):
        super().__init__(daemon=True)
        self.state, self.records, self.stopping = state, [], threading.Event()
        self.on_first = on_first  # called once the first shard is done

    def poll(self) -> None:
        import ray

        for record in ray.get(self.state.records_since.remote(len(self.records))):
            if not self.records and self.on_first is not None:
                self.on_first()
            self.records.append(record)
            print(shard_line(record), flush=True)

    def run(self) -> None:
        from ray.exceptions import RayActorError

        while not self.stopping.wait(0.5):
            try:
                self.poll()
            except RayActorError as e:  # the state actor is gone: the crawl is failing
                logger.warning("crawl: no more shard lines, the crawl's state actor is gone (%s)", type(e).__name__)
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def totals(records: list[dict], end: int | None, pages: range, summary, start: float) -> dict:
    """The crawl's totals from the shard records (pages up to the tag's end), and its warnings."""
    rows = sorted((p for r in records for p in r["pages"] if end is None or p["page"] <= end),
                  key=lambda p: p["page"])
    crawled = [r for r in records if not r["resumed"]]
    started = time.time() - (time.perf_counter() - start)  # the crawl's start, on the clock of `finished_at`
    stats = {
        "pages_ok": sum(p["status"] == "ok" for p in rows),
        "pages_failed": sum(p["status"] == "failed" for p in rows),
        "failed_pages": {p["url"]: p["error"] for p in rows if p["status"] == "failed"},
        "last_page": end, "items": sum(p["items"] for p in rows),
        "pages_with_items": sum(p["items"] > 0 for p in rows),
        "new_images": summary.images_in,
        "browser_restarts": sum(r["browser_restarts"] for r in crawled),
        "shards": [{k: r[k] for k in ("first", "last", "seconds", "resumed", "complete")}
                   for r in sorted(records, key=lambda r: r["first"])],
        "page_seconds": {p["page"]: p["seconds"] for p in rows if p.get("seconds") is not None},
        # from the start to the last shard read here (the pages overlap the downloads)
        "pages_seconds": max([r["finished_at"] - started for r in crawled], default=0.0),
    }
    warnings = []
    asked = (end if end is not None else pages[-1]) - pages[0] + 1
    if stats["items"] == 0:
        warnings.append(f"no items on any of the {len(rows)} page(s) read: check the profile's selectors, or "
                        "raise its settle_s if the items arrive late")
    elif stats["pages_with_items"] < FEW_PAGES and len(pages) > FEW_PAGES:
        warnings.append(f"items on only {stats['pages_with_items']} page(s) of {pages[0]}-{pages[-1]}"
                        + (f" (the tag ends at page {end})" if end is not None else "")
                        + ": if the tag has more, its pages may render slowly (raise settle_s in the profile) "
                          "or the selectors may not match them")
    if stats["pages_failed"]:
        warnings.append(f"{stats['pages_failed']} of {asked} page(s) failed, e.g. "
                        f"{next(iter(stats['failed_pages'].items()))[0]}: "
                        f"{next(iter(stats['failed_pages'].values()))}; re-run the same command to retry them "
                        "(finished shards are skipped)")
    stats["warnings"] = warnings
    return stats
