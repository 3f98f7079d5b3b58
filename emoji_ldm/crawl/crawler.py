"""`emoji-ldm crawl`: a site's tag pages, read in headless Chromium, streamed into a new dataset version.

    emoji-ldm crawl --profile discords|FILE --tag Blobs [--pages 1-1000] --out URI [--workers 2]

One Ray Data pipeline, nothing of it listed on the driver:

    shards (from_items, one block of `shard_pages` page numbers each)
      -> map_batches(PageReader, ActorPoolStrategy(size=workers), batch_size=1)
             each actor owns one headless Chromium; per shard: reads its pages
             in order (paced to the per-host rate, retried with back-off, the
             browser replaced if it crashes), writes the shard's stats file,
             emits one row per item (locator = the unwrapped image URL, page)
      -> left anti-join on locator against the table's `source_url` column
         (images already in the table are not downloaded again); on a new
         table a hash repartition on locator instead
      -> map_batches(_after_pages): the tag-end filter, then one row per
         image URL (the one on the lowest page)
      -> ingest_dataset: download, clean, de-duplicate by content, one commit

A page is read once it has settled (see `profiles.py`): items are read when
their count stops growing; a page is empty only when the document is complete
and no item has appeared for the profile's `settle_s`, or when its
`empty_marker` shows. A crawl whose first page yields nothing (empty or
failed) stops with a UserError naming the page and the selectors; a crawl
with items on only a few pages, or with failed pages, ends with warnings.

The tag-end rule ("the tag ends at the first empty page"), with independent
shards. A small Ray actor, `CrawlState`, holds the smallest empty page found
so far (P) and which shards have finished:
- a shard stops at its own first empty page and reports it (P = min);
- before each page a shard asks for P: a shard whose next page is past P stops
  there (a shard not yet started whose first page is past P emits nothing);
- items of pages past P can still have been emitted by a shard that read them
  before P was known, so they are dropped after the anti-join (or the
  repartition): both are all-to-all operators that emit nothing before every
  shard's rows are in, so by then P is final. `_after_pages` checks that (every
  shard finished) and fails loudly rather than guess.
The actor's state is bounded by the number of shards. Shards finished in an
earlier run seed P from their stats files.

Stats and resume: a shard that read all its pages, or stopped at its own empty
page, writes `_emoji_ldm/crawl/<profile>/<tag>/shard-FIRST-LAST.json` (pages,
statuses, items); a re-run re-emits the items of those shards from the file
(the anti-join drops what was committed) and crawls the rest again (shards
with failed pages, shards cut short by another shard's empty page). The
driver prints each shard's line as it finishes, from `CrawlState`, and the
totals from those records (bounded by the number of shards).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa

from emoji_ldm.config import opt
from emoji_ldm.crawl.profiles import SiteProfile, load_profile, parse_pages
from emoji_ldm.errors import UserError
from emoji_ldm.imaging import ImageConfig
from emoji_ldm.ingest.build import BuildConfig
from emoji_ldm.sources.base import FetchConfig

# One call to the page for every item: [src, title] of the image inside each item element.
READ_ITEMS_JS = """
const [itemSel, imageSel, urlAttr, titleAttr] = arguments;
return Array.from(document.querySelectorAll(itemSel)).map(item => {
  const img = item.querySelector(imageSel);
  const src = img && img.getAttribute(urlAttr);
  return src ? [src, img.getAttribute(titleAttr) || item.textContent.trim()] : null;
}).filter(Boolean);
"""
# Polled while a page settles: [document.readyState, items with an image URL, the empty marker is present].
PAGE_STATE_JS = """
const [itemSel, imageSel, urlAttr, markerSel] = arguments;
let n = 0;
for (const item of document.querySelectorAll(itemSel)) {
  const img = item.querySelector(imageSel);
  if (img && img.getAttribute(urlAttr)) n++;
}
return [document.readyState, n, markerSel ? document.querySelector(markerSel) !== null : false];
"""
POLL_S = 0.1
# The rows the page stage emits: the columns `ingest_dataset` takes, and the page number for the tag-end filter.
ITEM_SCHEMA = pa.schema([("locator", pa.string()), ("source", pa.string()), ("source_url", pa.string()),
                         ("page_url", pa.string()), ("title", pa.string()), ("tag", pa.string()),
                         ("caption", pa.string()), ("page", pa.int64())])
FEW_PAGES = 3  # fewer pages with items than this, out of a longer range, is worth a warning


@dataclass(frozen=True)
class CrawlConfig:
    profile: str = opt(help="a built-in site profile (discords) or a profile YAML file")
    tag: str = opt(help="the tag to crawl, e.g. Blobs")
    out: str = opt(help="dataset URI: a local path or s3://bucket/prefix")
    pages: str | None = opt(None, help="page range N-M (default: the profile's, discords 1-1000)")
    workers: int = opt(2, help="browsers, one per Ray actor")
    shard_pages: int = opt(5, help="pages per shard")
    rate_per_host: float = opt(1.0, flag="rate",
                               help="page loads per second per host, all browsers together; 0 lifts the limit")
    retries: int = opt(2, help="extra attempts per page after a timeout or browser error")
    backoff_s: float = opt(1.0, cli=False, help="first wait before a page retry")
    robots: bool = opt(True, flag="ignore-robots", invert=True,
                       help="do not honour robots.txt (only with the site's permission)")
    image: ImageConfig = opt(default_factory=ImageConfig, help="how images are normalised")
    fetch: FetchConfig = opt(default_factory=FetchConfig, skip=("retries",), help="how images are downloaded")
    message: str = opt("", help="a note recorded with the new version")

    def __post_init__(self):
        if not self.tag.strip():
            raise UserError("--tag is empty: name the tag to crawl, e.g. Blobs")
        for name in ("workers", "shard_pages"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rate_per_host < 0:
            raise UserError(f"--rate must be >= 0 page loads per second, got {self.rate_per_host}")
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        if self.pages is not None:
            parse_pages(self.pages)


class CrawlState:
    """A small Ray actor shared by the page readers and the tag-end filter: the tag's end so far (the
    smallest empty page), the shards still to finish, and each finished shard's summary for the driver."""

    def __init__(self, end: int | None, shards: list[int]):
        self._end = end
        self.todo = set(shards)  # first pages of the shards still to finish
        self.records: list[dict] = []

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


class PageReader:
    """A Ray Data actor-pool UDF owning one headless Chromium: one shard per call, its items out as rows."""

    def __init__(self, profile: SiteProfile, tag: str, out: str, first_page: int, state, min_interval_s: float,
                 retries: int, backoff_s: float):
        self.profile, self.tag, self.out, self.first_page, self.state = profile, tag, out, first_page, state
        self.min_interval_s, self.retries, self.backoff_s = min_interval_s, retries, backoff_s
        self.source = f"crawl:{profile.name}/{tag}"
        self.browser = None
        self.last_load = 0.0
        self.restarts = 0

    def _driver(self):
        from emoji_ldm.crawl.browser import Browser

        if self.browser is None:
            self.browser = Browser(page_timeout_s=self.profile.page_timeout_s, images=False)
        return self.browser.driver

    def _replace_browser(self) -> None:
        if self.browser is not None:
            try:
                self.browser.quit()
            except Exception:
                pass
        self.browser = None
        self.restarts += 1

    def _pace(self) -> None:
        wait = self.last_load + self.min_interval_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last_load = time.monotonic()

    def _settle(self, driver) -> tuple[str, list, str]:
        """After `wait_for`: (ok, items, "") once the items stop arriving; (empty, [], how) once the page
        is complete and stays without items for `settle_s`, or shows the empty marker; (failed, ...) when
        neither happens in time. Not rendered yet is never empty."""
        p = self.profile
        deadline = time.monotonic() + p.page_timeout_s + p.settle_s
        count, changed, complete_since = -1, time.monotonic(), None
        while True:
            state, n, marker = driver.execute_script(PAGE_STATE_JS, p.item, p.image, p.image_url_attr,
                                                     p.empty_marker)
            now = time.monotonic()
            if n != count:
                count, changed = n, now
            if state == "complete" and complete_since is None:
                complete_since = now
            if n == 0 and marker:
                return "empty", [], f"empty marker {p.empty_marker!r}"
            quiet = now - max(changed, complete_since or now)
            if complete_since is not None and n > 0 and quiet >= p.items_settle_s:
                break
            if complete_since is not None and n == 0 and quiet >= p.settle_s:
                return "empty", [], f"no items {p.settle_s:g} s after the page completed"
            if now > deadline:
                if n > 0:
                    break  # still growing: take what is there
                return "failed", [], (f"timeout: the page did not settle within {p.page_timeout_s + p.settle_s:g} s "
                                      f"(document {state}, no {p.item!r} yet)")
            time.sleep(POLL_S)
        return "ok", driver.execute_script(READ_ITEMS_JS, p.item, p.image, p.image_url_attr, p.title_attr), ""

    def read_page(self, url: str) -> dict:
        """{status: ok|empty|failed, items: [[src, title]], error, attempts, seconds}; for empty, `error`
        says why the page counts as empty."""
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        p = self.profile
        error = ""
        start = time.perf_counter()
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                time.sleep(self.backoff_s * 2 ** (attempt - 2))
            self._pace()
            try:
                driver = self._driver()
                driver.get(url)
                WebDriverWait(driver, p.page_timeout_s, poll_frequency=0.05).until(  # default polls every 0.5 s
                    ec.presence_of_element_located((By.CSS_SELECTOR, p.wait_for)))
                status, items, why = self._settle(driver)
                if status != "failed":
                    return {"status": status, "items": items, "error": why, "attempts": attempt,
                            "seconds": round(time.perf_counter() - start, 3)}
                error = why
            except TimeoutException:
                error = f"timeout: {p.wait_for!r} did not appear within {p.page_timeout_s:g} s"
            except WebDriverException as e:  # a crashed or hung browser: start a fresh one
                error = f"browser: {str(e).splitlines()[0][:160]}"
                self._replace_browser()
        return {"status": "failed", "items": [], "error": error, "attempts": self.retries + 1,
                "seconds": round(time.perf_counter() - start, 3)}

    def _first_page_error(self, result: dict) -> UserError:
        p = self.profile
        where = f"the first page {result['url']}"
        selectors = f"wait_for {p.wait_for!r}, item {p.item!r}, image {p.image!r} ({p.image_url_attr})"
        if result["status"] == "failed":
            return UserError(f"{where} did not render after {result['attempts']} attempt(s): {result['error']} "
                             f"[{selectors}]; check the URL, the tag and the profile's wait_for")
        if p.empty_marker and result["error"].startswith("empty marker"):
            return UserError(f"{where} shows the profile's empty_marker {p.empty_marker!r}: tag {self.tag!r} has "
                             f"no items there [{selectors}]; check the tag name and the page range")
        return UserError(f"{where} has no items: {result['error']} [{selectors}]; check the profile's item and "
                         f"image selectors against the page, or raise its settle_s if the items arrive later")

    def crawl_shard(self, pages: list[int]) -> tuple[dict, bool]:
        """Pages in order until the first empty one, or until the tag's end found by another shard; the shard's
        stats, and whether it finished on its own terms (all pages read, or its own empty page)."""
        import ray

        start = time.perf_counter()
        results, complete = [], True
        for page in pages:
            end = ray.get(self.state.end.remote())
            if end is not None and page > end:
                complete = False  # another shard found the end first
                break
            url = self.profile.page_url(self.tag, page)
            result = {"page": page, "url": url, **self.read_page(url)}
            if page == self.first_page and result["status"] != "ok":
                raise self._first_page_error(result)
            results.append(result)
            if result["status"] == "empty":
                ray.get(self.state.empty_at.remote(page))
                break
        return {"pages": results, "first": pages[0], "last": pages[-1], "seconds": time.perf_counter() - start,
                "browser_restarts": self.restarts}, complete  # first/last: the shard as assigned

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        from emoji_ldm.store.artifacts import read_json, write_json

        first, last, resumed = (batch.column(c)[0].as_py() for c in ("first", "last", "resumed"))
        uri = _shard_uri(self.out, self.profile.name, self.tag, first, last)
        if resumed:  # finished in an earlier run: its items again (the anti-join drops those committed)
            shard, complete = read_json(uri), True
        else:
            shard, complete = self.crawl_shard(list(range(first, last + 1)))
            if complete:
                write_json(uri, shard)  # marks the shard done for a re-run
        ray.get(self.state.finished.remote(first, None if resumed else _summary(shard, resumed=False,
                                                                                complete=complete)))
        rows = [{"locator": self.profile.original_image_url(src, p["url"]), "source": self.source,
                 "source_url": None, "page_url": p["url"], "title": title or "", "tag": self.tag, "caption": None,
                 "page": p["page"]}
                for p in shard["pages"] if p["status"] == "ok" for src, title in p["items"] if src]
        return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)

    def __del__(self):
        if self.browser is not None:
            try:
                self.browser.quit()
            except Exception:
                pass


def _summary(shard: dict, *, resumed: bool, complete: bool = True) -> dict:
    """A shard's stats without its items: what the driver prints and totals (bounded by the shard's pages)."""
    return {"first": shard["first"], "last": shard["last"], "seconds": shard["seconds"], "resumed": resumed,
            "complete": complete, "browser_restarts": shard.get("browser_restarts", 0), "finished_at": time.time(),
            "pages": [{"page": p["page"], "url": p["url"], "status": p["status"], "items": len(p["items"]),
                       "error": p["error"], "seconds": p.get("seconds")} for p in shard["pages"]]}


def _shard_line(r: dict) -> str:
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


def _after_pages(batch: pa.Table, state) -> pa.Table:
    """Runs after an all-to-all operator keyed on locator: drops pages past the tag's end, keeps one row per
    image URL (its lowest page), and the columns `ingest_dataset` takes."""
    import ray

    end, todo = ray.get(state.snapshot.remote())
    if todo:
        raise RuntimeError(f"the tag-end filter ran while {todo} page shard(s) were still running; it must follow "
                           "an all-to-all operator (join or repartition) on the page stage's output")
    return _tag_end_filter(batch, end)


def _tag_end_filter(batch: pa.Table, end: int | None) -> pa.Table:
    """Rows of pages up to `end`, one per locator (the lowest page), without the `page` column."""
    import pyarrow.compute as pc

    if end is not None:
        batch = batch.filter(pc.less_equal(batch.column("page"), end))
    if batch.num_rows > 1:
        batch = batch.sort_by([("locator", "ascending"), ("page", "ascending")])
        loc = batch.column("locator").combine_chunks()
        first = pc.fill_null(pc.not_equal(loc.slice(1), loc.slice(0, len(loc) - 1)), True)
        batch = batch.filter(pa.concat_arrays([pa.array([True]), first]))
    return batch.drop_columns(["page"])


def _shard_uri(out: str, profile: str, tag: str, first: int, last: int) -> str:
    from emoji_ldm.store.uri import join

    return join(_stats_dir(out, profile, tag), f"shard-{first:05d}-{last:05d}.json")


def _stats_dir(out: str, profile: str, tag: str) -> str:
    from emoji_ldm.store.uri import join

    safe_tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)
    return join(out, "_emoji_ldm", "crawl", profile, safe_tag)


def _done_shard(out: str, profile: str, tag: str, shard: list[int]) -> dict | None:
    """A shard's recorded result when it finished without failed pages (then it is not crawled again)."""
    from emoji_ldm.store.artifacts import exists, read_json

    uri = _shard_uri(out, profile, tag, shard[0], shard[-1])
    if not exists(uri):
        return None
    result = read_json(uri)
    return result if not any(p["status"] == "failed" for p in result["pages"]) else None


def check_robots(profile: SiteProfile, tag: str, pages: range, user_agent: str, fetch: FetchConfig) -> None:
    """Refuse pages that the site's robots.txt disallows for us (a missing robots.txt allows all)."""
    from urllib.robotparser import RobotFileParser

    import urllib3

    first = profile.page_url(tag, pages[0])
    parsed = urlparse(first)
    robots_url = f"{parsed.scheme}://{parsed.netloc}/robots.txt"
    try:
        resp = urllib3.request("GET", robots_url, headers={"User-Agent": user_agent},
                               timeout=urllib3.Timeout(total=fetch.timeout_s), retries=urllib3.Retry(2))
    except urllib3.exceptions.HTTPError as e:
        raise UserError(f"cannot reach {parsed.netloc} ({robots_url}: {e.__class__.__name__}); check the host "
                        "or the network") from None
    if resp.status >= 400:
        return  # no robots.txt: everything is allowed
    parser = RobotFileParser()
    parser.parse(resp.data.decode("utf-8", errors="replace").splitlines())
    blocked = [p for p in (pages[0], pages[-1]) if not parser.can_fetch(user_agent, profile.page_url(tag, p))]
    if blocked:
        raise UserError(f"{robots_url} disallows {profile.page_url(tag, blocked[0])} for our user-agent: "
                        "crawl another site, or pass --ignore-robots if you have the site's permission")


class _Printer(threading.Thread):
    """Prints each shard's line on the driver as the shard finishes (from `CrawlState`)."""

    def __init__(self, state):
        super().__init__(daemon=True)
        self.state, self.records, self.stopping = state, [], threading.Event()

    def poll(self) -> None:
        import ray

        for record in ray.get(self.state.records_since.remote(len(self.records))):
            self.records.append(record)
            print(_shard_line(record), flush=True)

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                self.poll()
            except Exception:  # the state actor is gone: the crawl is ending
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def crawl(config: CrawlConfig):
    """Crawl one tag into a new version of the dataset at `config.out`; returns (BuildSummary, page stats)."""
    import ray
    import ray.data

    from emoji_ldm.crawl.browser import USER_AGENT
    from emoji_ldm.ingest.build import ingest_dataset
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import check_writable
    from emoji_ldm.store.delta import read_dataset, table_exists
    from emoji_ldm.store.uri import check_s3_bucket, normalize_uri

    profile = load_profile(config.profile)
    pages = parse_pages(config.pages or profile.pages)
    out = normalize_uri(config.out)
    check_s3_bucket(out)
    check_writable(out)
    if config.robots:
        check_robots(profile, config.tag, pages, USER_AGENT, config.fetch)
    source = f"crawl:{profile.name}/{config.tag}"
    start = time.perf_counter()
    ensure_ray()
    require_shared(out, "the dataset (--out), where the browser actors write their shard stats")
    shards = [list(pages[i:i + config.shard_pages]) for i in range(0, len(pages), config.shard_pages)]
    print(f"crawl: {source}: pages {pages[0]}-{pages[-1]} in {len(shards)} shard(s) on {config.workers} "
          f"browser(s), {config.rate_per_host or 'unlimited'} page loads/s per host", flush=True)

    # Shards finished in an earlier run are not crawled again; their empty page is the tag's end so far.
    resumed, end = [], None
    for shard in shards:
        done = _done_shard(out, profile.name, config.tag, shard)
        if done is not None:
            resumed.append(_summary(done, resumed=True))
            print(_shard_line(resumed[-1]), flush=True)
            empties = [p["page"] for p in done["pages"] if p["status"] == "empty"]
            if empties:
                end = min(empties + ([end] if end is not None else []))
    done_firsts = {r["first"] for r in resumed}
    todo = [{"first": s[0], "last": s[-1], "resumed": s[0] in done_firsts}
            for s in shards if end is None or s[0] <= end]

    state = ray.remote(num_cpus=0)(CrawlState).remote(end, [s["first"] for s in todo])
    interval = config.workers / config.rate_per_host if config.rate_per_host > 0 else 0.0
    items = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
        PageReader, batch_size=1, batch_format="pyarrow", num_cpus=0.5,  # mostly waiting on Chromium
        compute=ray.data.ActorPoolStrategy(size=config.workers, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs=dict(profile=profile, tag=config.tag, out=out, first_page=pages[0], state=state,
                                   min_interval_s=interval, retries=config.retries, backoff_s=config.backoff_s))
    # An all-to-all operator keyed on locator: images already in the table go, and every row of one image URL
    # lands in one block; nothing comes out of it before every shard is done, so the tag's end is final.
    partitions = max(1, min(32, len(todo) // 8))
    if table_exists(out):
        known, _ = read_dataset(out, columns=["source_url"])
        items = items.join(known, "left_anti", num_partitions=partitions, on=("locator",), right_on=("source_url",))
    else:
        items = items.repartition(partitions, keys=["locator"])
    items = items.map_batches(_after_pages, fn_kwargs={"state": state}, batch_format="pyarrow", batch_size=None)

    build = BuildConfig(source=source, out=out, image=config.image, fetch=config.fetch,
                        message=config.message or f"crawl {source}")
    metadata = {"crawl": {"profile": profile.name, "tag": config.tag, "pages": f"{pages[0]}-{pages[-1]}",
                          "shards": len(shards), "resumed_shards": len(resumed),
                          "stats": _stats_dir(out, profile.name, config.tag)},
                "crawl_config": dataclasses.asdict(config)}
    printer = _Printer(state)
    printer.start()
    try:
        summary = ingest_dataset(items, build, extra_metadata=metadata, start=start)
        printer.stop()
        printer.poll()
        end = ray.get(state.end.remote())
    finally:
        printer.stop()
        ray.kill(state)
    stats = _totals(resumed + printer.records, end, pages, summary, start)
    print(f"crawl: {stats['pages_ok']} pages ok, {stats['pages_failed']} failed"
          + (f" (e.g. {next(iter(stats['failed_pages'].values()))})" if stats["pages_failed"] else "")
          + (f", tag ends at page {end}" if end is not None else ", no empty page in the range")
          + f"; {stats['items']} items on {stats['pages_with_items']} page(s), {stats['new_images']} new "
          f"distinct image URLs; pages read in {stats['pages_seconds']:.1f} s", flush=True)
    return summary, stats


def _totals(records: list[dict], end: int | None, pages: range, summary, start: float) -> dict:
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


def report(result) -> str:
    summary, stats = result
    return "\n".join([str(summary), *(f"crawl: WARNING: {w}" for w in stats.get("warnings", []))])
