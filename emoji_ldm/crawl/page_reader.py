"""The page stage of a crawl: a Ray Data actor that owns one headless Chromium and reads one shard of a tag's
pages per call, each page once it has settled (profiles.py), paced to the per-host rate and retried with
back-off; it writes the shard's stats file and emits one row per item (`ITEM_SCHEMA`)."""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from emoji_ldm.crawl.profiles import SiteProfile
from emoji_ldm.crawl.shards import shard_summary, shard_uri
from emoji_ldm.errors import UserError

logger = logging.getLogger(__name__)

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
            _quit(self.browser)
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
        uri = shard_uri(self.out, self.profile.name, self.tag, first, last)
        if resumed:  # finished in an earlier run: its items again (the anti-join drops those committed)
            shard, complete = read_json(uri), True
        else:
            shard, complete = self.crawl_shard(list(range(first, last + 1)))
            if complete:
                write_json(uri, shard)  # marks the shard done for a re-run
        record = None if resumed else shard_summary(shard, resumed=False, complete=complete)
        ray.get(self.state.finished.remote(first, record))
        rows = [{"locator": self.profile.original_image_url(src, p["url"]), "source": self.source,
                 "source_url": None, "page_url": p["url"], "title": title or "", "tag": self.tag, "caption": None,
                 "page": p["page"]}
                for p in shard["pages"] if p["status"] == "ok" for src, title in p["items"] if src]
        return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)

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
