"""`emoji-ldm crawl`: read a site's tag pages in headless Chromium on Ray actors, then ingest the images.

    emoji-ldm crawl --profile discords|FILE --tag Blobs [--pages 1-1000] --out URI [--workers 2]

Stage 1, pages: the page range is cut into shards of `shard_pages` pages; each
`PageCrawler` actor owns one Chromium and reads its shards in order (paced to
the per-host rate, retried with back-off, the browser replaced if it crashes).
A page whose `wait_for` never appears is recorded as failed after its timeout;
the tag ends at the first page that renders with no items, and no shard past
it is started.
Stage 2, images: the unwrapped image URLs (each once) go through the
foundation's ingest (concurrent downloads with retries, decode, resize,
de-duplicate, reject with reason) into one new dataset version with
`source=crawl:<profile>/<tag>` and the page URL per row.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from emoji_ldm.crawl.profiles import SiteProfile, load_profile, parse_pages
from emoji_ldm.errors import UserError
from emoji_ldm.ingest.build import BuildConfig, ingest_items
from emoji_ldm.ingest.images import ImageConfig
from emoji_ldm.options import opt
from emoji_ldm.sources.base import FetchConfig

# One call to the page for every item: [src, title] of the image inside each item element.
READ_ITEMS_JS = """
const [itemSel, imageSel, urlAttr, titleAttr] = arguments;
return Array.from(document.querySelectorAll(itemSel)).map(item => {
  const img = item.querySelector(imageSel);
  return img ? [img.getAttribute(urlAttr), img.getAttribute(titleAttr) || item.textContent.trim()] : null;
}).filter(Boolean);
"""


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


class PageCrawler:
    """A Ray actor owning one headless Chromium: reads pages, returns their items (raw src + title)."""

    def __init__(self, profile: SiteProfile, min_interval_s: float, retries: int, backoff_s: float):
        self.profile, self.min_interval_s, self.retries, self.backoff_s = profile, min_interval_s, retries, backoff_s
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

    def read_page(self, url: str) -> dict:
        """{status: ok|empty|failed, items: [[src, title]], error, attempts}"""
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        p = self.profile
        error = ""
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                time.sleep(self.backoff_s * 2 ** (attempt - 2))
            self._pace()
            try:
                driver = self._driver()
                driver.get(url)
                WebDriverWait(driver, p.page_timeout_s, poll_frequency=0.05).until(  # default polls every 0.5 s
                    ec.presence_of_element_located((By.CSS_SELECTOR, p.wait_for)))
                items = driver.execute_script(READ_ITEMS_JS, p.item, p.image, p.image_url_attr, p.title_attr)
                return {"status": "ok" if items else "empty", "items": items, "error": "", "attempts": attempt}
            except TimeoutException:
                error = f"timeout: {p.wait_for!r} did not appear within {p.page_timeout_s:g} s"
            except WebDriverException as e:  # a crashed or hung browser: start a fresh one
                error = f"browser: {str(e).splitlines()[0][:160]}"
                self._replace_browser()
        return {"status": "failed", "items": [], "error": error, "attempts": self.retries + 1}

    def crawl_shard(self, tag: str, pages: list[int]) -> dict:
        """Pages in order, stopping after the first empty one; per-shard stats for the driver."""
        start = time.perf_counter()
        results = []
        for page in pages:
            url = self.profile.page_url(tag, page)
            result = {"page": page, "url": url, **self.read_page(url)}
            results.append(result)
            if result["status"] == "empty":
                break
        return {"pages": results, "first": pages[0], "last": pages[-1], "seconds": time.perf_counter() - start,
                "browser_restarts": self.restarts}  # first/last: the shard as assigned, even when it stopped early

    def stop(self) -> None:
        if self.browser is not None:
            self.browser.quit()
            self.browser = None


def _shard_uri(out: str, profile: str, tag: str, first: int, last: int) -> str:
    from emoji_ldm.store.uri import join

    safe_tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)
    return join(out, "_emoji_ldm", "crawl", profile, safe_tag, f"shard-{first:05d}-{last:05d}.json")


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


def _source_urls(out: str) -> set[str]:
    from emoji_ldm.store.delta import open_table, table_exists

    if not table_exists(out):
        return set()
    return set(open_table(out).to_pyarrow_table(columns=["source_url"]).column("source_url").to_pylist())


def crawl(config: CrawlConfig):
    """Crawl one tag into a new version of the dataset at `config.out`; returns (BuildSummary, page stats)."""
    import ray
    from ray.util import ActorPool

    from emoji_ldm.crawl.browser import USER_AGENT
    from emoji_ldm.runtime import ensure_ray
    from emoji_ldm.sources.base import SourceItem
    from emoji_ldm.store.artifacts import check_writable
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
    interval = config.workers / config.rate_per_host if config.rate_per_host > 0 else 0.0
    actor = ray.remote(num_cpus=0.5)(PageCrawler)  # mostly waiting on Chromium, which runs outside Ray
    crawlers = [actor.remote(profile, interval, config.retries, config.backoff_s) for _ in range(config.workers)]
    shards = [list(pages[i:i + config.shard_pages]) for i in range(0, len(pages), config.shard_pages)]
    print(f"crawl: {source}: pages {pages[0]}-{pages[-1]} in {len(shards)} shard(s) on {config.workers} "
          f"browser(s), {config.rate_per_host or 'unlimited'} page loads/s per host", flush=True)

    from emoji_ldm.store.artifacts import write_json

    results, first_empty = [], None

    def record(shard: dict, resumed: bool) -> None:
        nonlocal first_empty
        results.append(shard)
        empties = [p["page"] for p in shard["pages"] if p["status"] == "empty"]
        if empties:
            first_empty = min(empties + ([first_empty] if first_empty else []))
        ok = sum(p["status"] == "ok" for p in shard["pages"])
        failed = sum(p["status"] == "failed" for p in shard["pages"])
        print(f"crawl: shard pages {shard['first']}-{shard['last']}: {ok} ok, {failed} failed"
              + (f", empty at {empties[0]}" if empties else "")
              + f", {sum(len(p['items']) for p in shard['pages'])} items"
              + (" (done in an earlier run)" if resumed else f", {shard['seconds']:.1f} s"), flush=True)

    # Shards that finished in an earlier run (per-shard stats files) are not crawled again.
    todo = []
    for shard in shards:
        done = _done_shard(out, profile.name, config.tag, shard)
        if done is None:
            todo.append(shard)
        else:
            record(done, resumed=True)

    def wanted(shard: list[int]) -> bool:
        return first_empty is None or shard[0] < first_empty

    pool = ActorPool(crawlers)
    queue = [s for s in todo if wanted(s)]
    try:
        for shard in queue[: config.workers]:
            pool.submit(lambda a, s: a.crawl_shard.remote(config.tag, s), shard)
        queue = queue[config.workers:]
        while pool.has_next():
            shard = pool.get_next_unordered()
            write_json(_shard_uri(out, profile.name, config.tag, shard["first"], shard["last"]),
                       shard)  # marks the shard done for a re-run
            record(shard, resumed=False)
            queue = [s for s in queue if wanted(s)]
            if queue:
                pool.submit(lambda a, s: a.crawl_shard.remote(config.tag, s), queue.pop(0))
    finally:
        ray.get([c.stop.remote() for c in crawlers])
        for c in crawlers:
            ray.kill(c)

    page_rows = sorted((p for r in results for p in r["pages"]), key=lambda p: p["page"])
    if first_empty is not None:
        page_rows = [p for p in page_rows if p["page"] <= first_empty]
    items, seen = [], _source_urls(out)  # images already in the table are not downloaded again
    already = len(seen)
    for p in page_rows:
        for src, title in p["items"]:
            url = profile.original_image_url(src, p["url"]) if src else None
            if url and url not in seen:  # the same image on several pages is downloaded once
                seen.add(url)
                items.append(SourceItem(locator=url, source=source, title=title or "", tag=config.tag,
                                        page_url=p["url"]))
    stats = {
        "pages_ok": sum(p["status"] == "ok" for p in page_rows),
        "pages_failed": sum(p["status"] == "failed" for p in page_rows),
        "failed_pages": {p["url"]: p["error"] for p in page_rows if p["status"] == "failed"},
        "last_page": first_empty, "items": sum(len(p["items"]) for p in page_rows), "new_images": len(items),
        "images_in_table": already,
        "browser_restarts": sum(r["browser_restarts"] for r in results),
        "shards": [{k: r[k] for k in ("first", "last", "seconds")} for r in results],
        "pages_seconds": time.perf_counter() - start,
    }
    print(f"crawl: {stats['pages_ok']} pages ok, {stats['pages_failed']} failed"
          + (f" (e.g. {next(iter(stats['failed_pages'].values()))})" if stats["pages_failed"] else "")
          + f", tag ends at page {first_empty}" * (first_empty is not None)
          + f"; {stats['items']} items, {len(items)} new distinct images ({already} already in the table) in "
          f"{stats['pages_seconds']:.1f} s", flush=True)
    build = BuildConfig(source=source, out=out, image=config.image, fetch=config.fetch,
                        message=config.message or f"crawl {source}")
    summary = ingest_items(items, build, extra_metadata={"crawl": {k: v for k, v in stats.items()
                                                                   if k != "failed_pages"},
                                                        "crawl_config": dataclasses.asdict(config)})
    return summary, stats


def report(result) -> str:
    summary, _ = result
    return str(summary)
