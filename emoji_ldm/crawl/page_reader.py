"""The page stage of a crawl: a Ray Data actor that owns one headless Chromium and reads one shard of a tag's
pages per call, each page once it has settled (profiles.py), paced to the per-host rate and retried with
back-off; it writes the shard's stats file and emits one row per item (`ITEM_SCHEMA`)."""

from __future__ import annotations

import logging
import threading
import time

import pyarrow as pa

from emoji_ldm.crawl.profiles import POLL_S, Settling, SiteProfile
from emoji_ldm.crawl.shards import ShardFetch, shard_summary, shard_uri
from emoji_ldm.errors import UserError

logger = logging.getLogger(__name__)

# Polled while a page settles: [document.readyState, items with an image URL, the empty marker is present,
# `wait_for` is present, [src, title] of the image inside each item (the reading that settles a page gives its
# items)].
READ_JS = """
const read = (itemSel, imageSel, urlAttr, markerSel, waitSel, titleAttr) => {
  const items = [];
  for (const item of document.querySelectorAll(itemSel)) {
    const img = item.querySelector(imageSel);
    const src = img && img.getAttribute(urlAttr);
    if (src) items.push([src, img.getAttribute(titleAttr) || item.textContent.trim()]);
  }
  return [document.readyState, items.length, markerSel ? document.querySelector(markerSel) !== null : false,
          document.querySelector(waitSel) !== null, items];
};
"""
PAGE_STATE_JS = READ_JS + "return read(...arguments);"
# The same reading, taken (asynchronously) once the page shows items or its empty marker, or after arguments[6] ms:
# a page's first items are seen when they appear, not at the next poll (the next window opens on them).
ITEMS_STATE_JS = READ_JS + """
const done = arguments[arguments.length - 1], args = [...arguments].slice(0, 6);
const shown = r => (r[3] && r[1] > 0) || r[2];
let first = read(...args);
if (shown(first)) return done(first);
let timer = null;
const seen = new MutationObserver(() => {
  const r = read(...args);
  if (shown(r)) { seen.disconnect(); clearTimeout(timer); done(r); }
});
seen.observe(document, {childList: true, subtree: true, attributes: true});
timer = setTimeout(() => { seen.disconnect(); done(read(...args)); }, arguments[6]);
"""
# Pages of a shard open at once, each in a window of the actor's browser: the next page opens once the last one opened
# shows items (so never a page past an empty one: the pages loaded are those a one-by-one reader loads), and each
# settles while the next loads. Windows, not tabs: switching to a tab brings it to the front and repaints it, about
# 30 ms of Chromium's CPU each time (2.7 switches a page), against 0.3 ms for a window (bench/crawl.py).
WINDOWS = 3
# Shards a page reader holds at once: one reads its pages while the one before finishes its downloads
CONCURRENT_SHARDS = 2


# The rows the page stage emits: the columns `ingest_dataset` takes, and the page number for the tag-end filter.
ITEM_SCHEMA = pa.schema([("locator", pa.string()), ("source", pa.string()), ("source_url", pa.string()),
                         ("page_url", pa.string()), ("title", pa.string()), ("tag", pa.string()),
                         ("caption", pa.string()), ("page", pa.int64())])


class PageReader:
    """A Ray Data actor-pool UDF owning one headless Chromium: one shard per call, its items out as rows.

    Two calls run at once (`CONCURRENT_SHARDS`), the browser held by one at a time: the next shard's pages load
    while the last one's images finish downloading. A call reads whichever shard is next in page order when it gets
    the browser (`CrawlState.take`), not the row Ray Data handed it: a call queued behind a busy browser binds no
    pages, so no reader is left with shards far ahead of the others."""

    def __init__(self, profile: SiteProfile, tag: str, out: str, first_page: int, state, min_interval_s: float,
                 retries: int, backoff_s: float, fetch: tuple | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.profile, self.tag, self.out, self.first_page, self.state = profile, tag, out, first_page, state
        # (ImageConfig, FetchConfig): a shard's images are downloaded and cleaned while its pages are read, and the
        # rows are `ingest_batch`'s (with the page); None: the rows are the items (`ITEM_SCHEMA`)
        self.fetch = fetch
        # one thread downloads for all of this reader's shards, in the order their pages were read
        self.fetch_pool = ThreadPoolExecutor(1, thread_name_prefix="shard-fetch") if fetch else None
        self.reading = threading.Lock()  # the browser: one shard's pages at a time
        self.min_interval_s, self.retries, self.backoff_s = min_interval_s, retries, backoff_s
        self.source = f"crawl:{profile.name}/{tag}"
        self.browser = None
        self.last_load = 0.0
        self.restarts = 0
        self.window = None  # the window the driver is in
        self.windows: list[str] = []  # the browser's windows, as opened (up to WINDOWS)

    def _driver(self):
        from emoji_ldm.crawl.browser import Browser

        if self.browser is None:
            self.browser = Browser(page_timeout_s=self.profile.page_timeout_s, images=False)
        return self.browser.driver

    def _replace_browser(self) -> None:
        if self.browser is not None:
            _quit(self.browser)
        self.browser, self.window, self.windows = None, None, []
        self.restarts += 1

    def _pace(self) -> None:
        wait = self.last_load + self.min_interval_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last_load = time.monotonic()

    def _state(self, driver, wait_s: float = 0.0) -> list:
        """A PAGE_STATE_JS reading; with `wait_s`, taken once the page shows items (or its empty marker), waiting
        in the page at most `wait_s`."""
        p = self.profile
        args = (p.item, p.image, p.image_url_attr, p.empty_marker, p.wait_for, p.title_attr)
        if wait_s > 0:
            return driver.execute_async_script(ITEMS_STATE_JS, *args, int(wait_s * 1000))
        return driver.execute_script(PAGE_STATE_JS, *args)

    def _switch(self, driver, window: str) -> None:
        if self.window != window:
            driver.switch_to.window(window)
            self.window = window

    def _settle(self, driver) -> tuple[str, list, str]:
        """After `wait_for`: (ok, items, "") once the items stop arriving; (empty, [], how) once the page
        is complete and stays without items for `settle_s`, or shows the empty marker; (failed, ...) when
        neither happens in time. Not rendered yet is never empty."""
        settling = Settling(self.profile, time.monotonic())
        while True:
            state, n, marker, _, items = self._state(driver)
            verdict = settling.step(state, n, marker, time.monotonic())
            if verdict is not None:
                break
            time.sleep(max(0.0, settling.next_reading(time.monotonic()) - time.monotonic()))
        status, why = verdict
        return status, items if status == "ok" else [], why

    def read_page(self, url: str, first_attempt: int = 1, start: float | None = None) -> dict:
        """{status: ok|empty|failed, items: [[src, title]], error, attempts, seconds}; for empty, `error`
        says why the page counts as empty. `first_attempt` > 1: the earlier ones were made (in `_read_ahead`,
        from `start`)."""
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        p = self.profile
        error = ""
        start = start or time.perf_counter()
        for attempt in range(first_attempt, self.retries + 2):
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

    def _free_window(self, driver, active: list[dict]) -> str:
        """A window with no page of `active` in it: one of the browser's, or a new one up to WINDOWS (opened when
        first needed, so a fresh browser's first page does not wait for the others: about 0.4 s each)."""
        if not self.windows:
            self.windows = [driver.current_window_handle]  # a fresh browser's own
        free = [w for w in self.windows if all(a["window"] != w for a in active)]
        if free:
            return free[0]
        driver.switch_to.new_window("window")
        self.window = driver.current_window_handle
        self.windows.append(self.window)
        return self.window

    def _open(self, driver, window: str, page: int) -> dict:
        """Load `page` in `window` (paced); the page's reading state."""
        url = self.profile.page_url(self.tag, page)
        self._switch(driver, window)
        self._pace()
        opened = {"page": page, "url": url, "window": window, "start": time.perf_counter(), "since": time.monotonic(),
                  "settling": None, "items_seen": False, "result": None, "next": 0.0}
        driver.get(url)
        return opened

    def _poll(self, driver, page: dict, wait_s: float = 0.0) -> dict | None:
        """One reading of an open page (`_state`): its result once decided (the same rule as `read_page`), else
        None."""
        p = self.profile
        self._switch(driver, page["window"])
        state, n, marker, rendered, items = self._state(driver, wait_s)
        now = time.monotonic()
        page["next"] = now + POLL_S
        if page["settling"] is None:
            if not rendered:
                if now - page["since"] <= p.page_timeout_s:
                    return None
                return self._result(page, "failed", [], f"timeout: {p.wait_for!r} did not appear within "
                                                        f"{p.page_timeout_s:g} s")
            page["settling"] = Settling(p, now)
        page["items_seen"] = page["items_seen"] or n > 0
        verdict = page["settling"].step(state, n, marker, now)
        if verdict is None:
            page["next"] = page["settling"].next_reading(now)
            return None
        return self._result(page, verdict[0], items if verdict[0] == "ok" else [], verdict[1])

    @staticmethod
    def _result(page: dict, status: str, items: list, why: str) -> dict:
        return {"status": status, "items": items, "error": why, "attempts": 1,
                "seconds": round(time.perf_counter() - page["start"], 3)}

    def _read_ahead(self, pages: list[int]) -> list[tuple[int, dict, float]]:
        """The first attempt at `pages`, in order, up to WINDOWS at once: (page, result, start) for a prefix of
        them, ending at the first page that is not ok or before one past the tag's end (none when the first page
        is past an end that another shard found while it loaded)."""
        import ray
        from selenium.common.exceptions import TimeoutException, WebDriverException

        p = self.profile
        done, active, todo = [], [], list(pages)
        checked = time.monotonic()
        try:
            driver = self._driver()
            while active or todo:
                if active and time.monotonic() - checked >= POLL_S:  # another shard found the tag's end meanwhile:
                    checked = time.monotonic()                       # the pages past it are not waited for
                    end = ray.get(self.state.end.remote())
                    if end is not None and active[0]["page"] > end:
                        return done
                while todo and len(active) < WINDOWS and (not active or active[-1]["items_seen"]):
                    end = ray.get(self.state.end.remote()) if done or active else None
                    if end is not None and todo[0] > end:
                        todo = []
                        break
                    free, page = self._free_window(driver, active), todo.pop(0)
                    try:
                        active.append(self._open(driver, free, page))
                    except TimeoutException:  # the page did not load in time: no later page is opened
                        late = {"page": page, "window": free, "start": time.perf_counter()}
                        late["result"] = self._result(late, "failed", [], f"timeout: {p.wait_for!r} did not appear "
                                                      f"within {p.page_timeout_s:g} s")
                        active.append(late)
                        todo = []
                # the last page opened, until it shows items: read as they appear (the next page opens on them)
                lead = active[-1] if active and active[-1]["result"] is None and not active[-1]["items_seen"] else None
                for page in active:
                    if page["result"] is None and page is not lead and page["next"] <= time.monotonic():
                        page["result"] = self._poll(driver, page)
                if lead is not None:
                    due = [a["next"] - time.monotonic() for a in active if a["result"] is None and a is not lead]
                    lead["result"] = self._poll(driver, lead, wait_s=max(0.01, min([POLL_S, *due])))
                while active and active[0]["result"] is not None:
                    page = active.pop(0)
                    done.append((page["page"], page["result"], page["start"]))
                    if page["result"]["status"] != "ok":
                        return done  # pages opened after it are read again by the caller
                waiting = [a["next"] for a in active if a["result"] is None]
                opening = todo and len(active) < WINDOWS and active[-1]["items_seen"]
                if waiting and not opening and (lead is None or lead["result"] is not None or lead["items_seen"]):
                    time.sleep(min(POLL_S, max(0.0, min(waiting) - time.monotonic())))
        except WebDriverException as e:  # a crashed or hung browser: its pages are read again, one by one
            self._replace_browser()
            first = pages[len(done)]
            done.append((first, {"status": "failed", "items": [], "error": f"browser: {str(e).splitlines()[0][:160]}",
                                 "attempts": 1, "seconds": 0.0}, time.perf_counter()))
        return done

    def crawl_shard(self, pages: list[int], fetching: ShardFetch | None = None) -> tuple[dict, bool]:
        """Pages in order until the first empty one, or until the tag's end found by another shard; the shard's
        stats, and whether it finished on its own terms (all pages read, or its own empty page). The first
        attempt at each page is made in `_read_ahead`, a failed page is retried in `read_page`."""
        import ray

        start = time.perf_counter()
        results, complete, i = [], True, 0
        while i < len(pages):
            end = ray.get(self.state.end.remote())
            if end is not None and pages[i] > end:
                complete = False  # another shard found the end first
                break
            stop = False
            for page, result, began in self._read_ahead(pages[i:]):
                i += 1
                url = self.profile.page_url(self.tag, page)
                if result["status"] == "failed" and self.retries:
                    result = self.read_page(url, first_attempt=2, start=began)
                result = {"page": page, "url": url, **result}
                if page == self.first_page and result["status"] != "ok":
                    raise self._first_page_error(result)
                results.append(result)
                self._page_done(result, fetching)
                if result["status"] == "empty":
                    ray.get(self.state.empty_at.remote(page))
                    stop = True
                    break
            if stop:
                break
        return {"pages": results, "first": pages[0], "last": pages[-1], "seconds": time.perf_counter() - start,
                "browser_restarts": self.restarts}, complete  # first/last: the shard as assigned

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        from emoji_ldm.store.artifacts import read_json, write_json

        fetching = ShardFetch(*self.fetch, pool=self.fetch_pool) if self.fetch else None
        with self.reading:
            shard = ray.get(self.state.take.remote())  # not `batch`: a row per shard, only counting the calls
            first, last, resumed = shard["first"], shard["last"], shard["resumed"]
            uri = shard_uri(self.out, self.profile.name, self.tag, first, last)
            if resumed:  # finished in an earlier run: its items again (the anti-join drops those committed)
                shard, complete = read_json(uri), True
                for page in shard["pages"]:
                    self._page_done(page, fetching)
            else:
                shard, complete = self.crawl_shard(list(range(first, last + 1)), fetching)
        if complete and not resumed:
            write_json(uri, shard)  # marks the shard done for a re-run
        record = None if resumed else shard_summary(shard, resumed=False, complete=complete)
        rows = fetching.table() if fetching else pa.concat_tables(
            [self._items(p) for p in shard["pages"]] + [ITEM_SCHEMA.empty_table()])
        ray.get(self.state.finished.remote(first, record))
        return rows

    def _items(self, page: dict) -> pa.Table:
        """One page's items as rows (`ITEM_SCHEMA`): locator = the unwrapped image URL."""
        rows = [{"locator": self.profile.original_image_url(src, page["url"]), "source": self.source,
                 "source_url": None, "page_url": page["url"], "title": title or "", "tag": self.tag, "caption": None,
                 "page": page["page"]} for src, title in page["items"] if src] if page["status"] == "ok" else []
        return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)

    def _page_done(self, page: dict, fetching: ShardFetch | None) -> None:
        """A page's result is final: its images start downloading (when this reader fetches)."""
        if fetching and page["status"] == "ok":
            fetching.add(self._items(page))

    def __del__(self):
        if self.browser is not None:
            _quit(self.browser)


def _quit(browser) -> None:
    """Quit a browser that may have crashed or hung. Its processes are killed either way (`Browser.quit`); a
    ChromeDriver that no longer answers the goodbye is logged, not raised."""
    import urllib3
    from selenium.common.exceptions import WebDriverException

    try:
        browser.quit()
    except (WebDriverException, urllib3.exceptions.HTTPError, OSError) as e:
        logger.warning("crawl: ChromeDriver did not quit cleanly (%s: %s); its processes were killed",
                       type(e).__name__, str(e).splitlines()[0][:160] if str(e) else "")
