"""`emoji-ldm crawl`: a site's tag pages, read in headless Chromium, streamed into a new dataset version.

    emoji-ldm crawl --profile discords|FILE --tag Blobs [--pages 1-1000] --out URI [--workers 2]

One Ray Data pipeline, nothing of it listed on the driver:

    one row per shard (range), the shards themselves queued in `CrawlState`
      -> map_batches(PageReader (page_reader.py), ActorPoolStrategy(size=workers), batch_size=1)
             each actor owns one headless Chromium and holds two calls; a call
             takes the next shard in page order once the browser is free: reads its pages
             in order (paced to the per-host rate, retried with back-off, the
             browser replaced if it crashes), writes the shard's stats file,
             emits one row per item (locator = the unwrapped image URL, page);
             into a new table it downloads and cleans each page's images
             (`ShardFetch`, each URL once per shard) while the next pages
             load, and emits those rows (with the page) instead
      -> materialize: every shard done, the tag's end final (the blocks stay
         in the object store)
      -> left anti-join on locator against the table's `source_url` column
         (images already in the table are not downloaded again); on a new
         table one block of all rows (`repartition(1)`), or a hash
         repartition on the URL past 16 MiB of rows
      -> map_batches(after_pages): the tag-end filter, then one row per
         image URL (the one on the lowest page)
      -> ingest_dataset: download and clean (done already for a new table),
         de-duplicate by content, one commit

A page is read once it has settled (see `profiles.py`): items are read when
their count stops growing; a page is empty only when the document is complete
and no item has appeared for the profile's `settle_s`, or when its
`empty_marker` shows. A crawl whose first page yields nothing (empty or
failed) stops with a UserError naming the page and the selectors; a crawl
with items on only a few pages, or with failed pages, ends with warnings.

The tag-end rule ("the tag ends at the first empty page"), with independent
shards (shards.py). A small Ray actor, `CrawlState`, holds the smallest empty page found
so far (P) and which shards have finished:
- a shard stops at its own first empty page and reports it (P = min);
- before each page a shard asks for P: a shard whose next page is past P stops
  there (a shard not yet started whose first page is past P emits nothing);
- items of pages past P can still have been emitted by a shard that read them
  before P was known, so they are dropped after the anti-join (or the
  repartition): both are all-to-all operators that emit nothing before every
  shard's rows are in, so by then P is final. `after_pages` checks that (every
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
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from emoji_ldm.config import opt
from emoji_ldm.crawl.page_reader import CONCURRENT_SHARDS, PageReader
from emoji_ldm.crawl.profiles import SiteProfile, load_profile, parse_pages
from emoji_ldm.crawl.shards import (
    CrawlState,
    ShardPrinter,
    after_pages,
    done_shard,
    shard_line,
    shard_summary,
    stats_dir,
    totals,
)
from emoji_ldm.errors import UserError
from emoji_ldm.imaging import ImageConfig
from emoji_ldm.ingest.build import BuildConfig
from emoji_ldm.sources.base import FetchConfig


@dataclass(frozen=True)
class CrawlConfig:
    profile: str = opt(help="a built-in site profile (discords) or a profile YAML file")
    tag: str = opt(help="the tag to crawl, e.g. Blobs")
    out: str = opt(help="dataset URI: a local path or s3://bucket/prefix")
    pages: str | None = opt(None, help="page range N-M (default: the profile's, discords 1-1000)")
    workers: int = opt(2, help="browsers, one per Ray actor")
    shard_pages: int = opt(10, help="pages per shard")
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


def _resumed_shards(out: str, profile: str, tag: str, shards: list[list[int]]) -> tuple[list[dict], int | None]:
    """The records of the shards finished in an earlier run (they are not crawled again), and the tag's end
    they found (their smallest empty page), each shard's line printed."""
    resumed, end = [], None
    for shard in shards:
        done = done_shard(out, profile, tag, shard)
        if done is not None:
            resumed.append(shard_summary(done, resumed=True))
            print(shard_line(resumed[-1]), flush=True)
            empties = [p["page"] for p in done["pages"] if p["status"] == "empty"]
            if empties:
                end = min(empties + ([end] if end is not None else []))
    return resumed, end


def _page_rows(config: CrawlConfig, profile: SiteProfile, out: str, first_page: int, shards: int, state):
    """The `shards` queued in `state` through the page readers: a lazy Ray Dataset of their rows (`ITEM_SCHEMA`, or
    `ingest_batch`'s rows with the page when they are fetched already), and whether they are."""
    import ray.data

    from emoji_ldm.store.delta import table_exists

    interval = config.workers / config.rate_per_host if config.rate_per_host > 0 else 0.0
    # a new table: each shard's images are downloaded while its next pages load, in the page readers; into a table,
    # after the anti-join, so that no image it holds is fetched again
    fetch = None if table_exists(out) else (config.image, config.fetch)
    # one call per shard; each call takes the next shard from `state` when its reader's browser is free
    rows = ray.data.range(shards, override_num_blocks=shards).map_batches(
        PageReader, batch_size=1, batch_format="pyarrow", num_cpus=0.5,  # mostly waiting on Chromium
        compute=ray.data.ActorPoolStrategy(size=config.workers, max_tasks_in_flight_per_actor=CONCURRENT_SHARDS,
                                           max_concurrent_calls_per_actor=CONCURRENT_SHARDS,
                                           enable_true_multi_threading=True),
        fn_constructor_kwargs=dict(profile=profile, tag=config.tag, out=out, first_page=first_page, state=state,
                                   min_interval_s=interval, retries=config.retries, backoff_s=config.backoff_s,
                                   fetch=fetch))
    return rows, fetch is not None


# What one image URL of the table weighs in the anti-join, to size its partitions
URL_BYTES = 128


def _after_pages(rows, fetched: bool, out: str, state):
    """The page stage run to its end, then one row per image URL up to the tag's end, less the images the table
    holds: the Ray Dataset `ingest_dataset` takes.

    The page stage's blocks are materialized (they stay in Ray's object store; the driver holds references), so
    every shard is done and the tag's end is final, and the keyed step after it is sized by the bytes the pages
    gave, not by the page range: the default range of a profile (1-1000) is far past most tags' ends."""
    from emoji_ldm.runtime.partitions import partitions_by_bytes
    from emoji_ldm.store.delta import open_table, read_dataset, row_count

    rows = rows.materialize()
    size = rows.size_bytes()
    key = "source_url" if fetched else "locator"  # `ingest_batch`'s rows: source_url is the locator
    # every row of one image URL lands in one block (and, into a table, images it holds go)
    if fetched:
        partitions = partitions_by_bytes(size)
        # one block: Ray's hash shuffle costs seconds to start
        keyed = rows.repartition(1) if partitions == 1 else rows.repartition(partitions, keys=[key])
    else:
        known, _ = read_dataset(out, columns=["source_url"])
        partitions = partitions_by_bytes(size + row_count(open_table(out)) * URL_BYTES)
        keyed = rows.join(known, "left_anti", num_partitions=partitions, on=("locator",), right_on=("source_url",))
    return keyed.map_batches(after_pages, fn_kwargs={"state": state, "key": key}, batch_format="pyarrow",
                             batch_size=None)


def _load_the_write_path() -> None:
    """Imports what the steps after the page stage run (the tag-end filter, the write, the Delta log). Run as a
    Ray task once the first shard is done, while the page readers mostly wait on their browsers, it leaves an
    idle worker of this job with them loaded, which the first task after the pages then gets: on a fresh worker
    those imports took about 1.4 s of a 2-core machine after the last page (bench/crawl.py)."""
    import emoji_ldm.crawl.shards  # noqa: F401
    import emoji_ldm.ingest.build  # noqa: F401


def _ingest(rows, fetched: bool, build: BuildConfig, metadata: dict, start: float, state):
    """Run the pipeline into one commit while the driver prints each shard's line as it finishes; returns the
    build summary, the tag's end and the records of the shards read in this run."""
    import ray

    from emoji_ldm.ingest.build import ingest_dataset

    printer = ShardPrinter(state, on_first=lambda: ray.remote(num_cpus=0)(_load_the_write_path).remote())
    printer.start()
    try:
        items = _after_pages(rows, fetched, build.out, state)
        summary = ingest_dataset(items, build, extra_metadata=metadata, start=start, fetched=fetched)
        printer.stop()
        printer.poll()
        end = ray.get(state.end.remote())
    finally:
        printer.stop()
        ray.kill(state)
    return summary, end, printer.records


def crawl(config: CrawlConfig):
    """Crawl one tag into a new version of the dataset at `config.out`; returns (BuildSummary, page stats)."""
    import ray

    from emoji_ldm.crawl.browser import USER_AGENT
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
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
    require_shared(out, "the dataset (--out), where the browser actors write their shard stats")
    shards = [list(pages[i:i + config.shard_pages]) for i in range(0, len(pages), config.shard_pages)]
    print(f"crawl: {source}: pages {pages[0]}-{pages[-1]} in {len(shards)} shard(s) on {config.workers} "
          f"browser(s), {config.rate_per_host or 'unlimited'} page loads/s per host", flush=True)
    resumed, end = _resumed_shards(out, profile.name, config.tag, shards)
    done_firsts = {r["first"] for r in resumed}
    todo = [{"first": s[0], "last": s[-1], "resumed": s[0] in done_firsts}
            for s in shards if end is None or s[0] <= end]
    state = ray.remote(num_cpus=0)(CrawlState).remote(end, todo)
    rows, fetched = _page_rows(config, profile, out, pages[0], len(todo), state)
    build = BuildConfig(source=source, out=out, image=config.image, fetch=config.fetch,
                        message=config.message or f"crawl {source}")
    metadata = {"crawl": {"profile": profile.name, "tag": config.tag, "pages": f"{pages[0]}-{pages[-1]}",
                          "shards": len(shards), "resumed_shards": len(resumed),
                          "stats": stats_dir(out, profile.name, config.tag)},
                "crawl_config": dataclasses.asdict(config)}
    summary, end, records = _ingest(rows, fetched, build, metadata, start, state)
    stats = totals(resumed + records, end, pages, summary, start)
    print(f"crawl: {stats['pages_ok']} pages ok, {stats['pages_failed']} failed"
          + (f" (e.g. {next(iter(stats['failed_pages'].values()))})" if stats["pages_failed"] else "")
          + (f", tag ends at page {end}" if end is not None else ", no empty page in the range")
          + f"; {stats['items']} items on {stats['pages_with_items']} page(s), {stats['new_images']} new "
          f"distinct image URLs; pages read in {stats['pages_seconds']:.1f} s", flush=True)
    return summary, stats


def report(result) -> str:
    summary, stats = result
    return "\n".join([str(summary), *(f"crawl: WARNING: {w}" for w in stats.get("warnings", []))])
