"""Crawling benchmark: the seed's sequential crawler vs `emoji-ldm crawl`, same local site, one run.

The site is the test suite's imitation of discords.com (`tests/crawl_site.py`), on 127.0.0.1, with
--pages pages of --per-page Twemoji each (no slow or failing pages here).

  seed: one Chromium, a per-page loop that reads each item with its own WebDriver calls, re-processes
        the whole list of items seen so far on every page, downloads every image once to hash it and
        again to save it, converts WebP, writes PNGs and metadata.csv; its 1 s sleep per page set to 0.
  ours: `crawl()` with --workers browser actors (2), --shard-pages pages a shard (10), politeness limits
        lifted (--rate 0), into a new table: each reader downloads and cleans a page's images while its
        next pages load, then the tag-end filter, de-duplication and one new Delta version.

    python bench/crawl.py [--pages 40] [--per-page 24] [--hydrate] [--repeat R] [--skip-seed] [--cold]
                          [--workers 2] [--shard-pages 10]

To time another commit's crawler (a bisect), run from inside its checkout with it first on the path (Ray's
workers import from the working folder; RAY_ADDRESS=local: older commits joined any Ray running on the machine):
`cd /tmp/bisect-<sha> && RAY_ADDRESS=local PYTHONPATH=$PWD /work/main/.venv/bin/python /work/main/bench/crawl.py
--skip-seed`; the site is always this checkout's.

--hydrate serves the pages as a hydrating Next.js page does (the container in the HTML, the items
fetched 0.5-1 s later): the seed's crawler reads them before the items exist and finds none.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, repeat, row, timed, write_record

sys.path.append(str(REPO))  # after PYTHONPATH: a bisect's checkout of emoji_ldm comes first


def seed_crawl(site, pages: int, folder: Path) -> dict:
    """The seed crawler's algorithm, as written (sleep 0)."""
    import urllib3
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from emoji_ldm.crawl.browser import Browser

    folder.mkdir(parents=True, exist_ok=True)
    http = urllib3.PoolManager()
    browser = Browser()
    driver = browser.driver
    seen, items, rows, loaded = set(), [], [], 0
    try:
        for page in range(1, pages + 2):
            driver.get(f"{site.base}/emoji-list/tag/Blobs?page={page}")
            WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.CSS_SELECTOR, "div.FS5UE28h.container")))
            loaded += 1
            found = driver.find_elements(By.CSS_SELECTOR, "div.LQY5mtmC div.aLnnpRah.text-center")
            if not found:
                break
            for item in found:
                img = item.find_element(By.CSS_SELECTOR, "div.Mw1EAtrx img")
                items.append((img.get_attribute("src"), img.get_attribute("title")))
            for src, title in items:  # the whole list again, on every page
                data = http.request("GET", src).data
                digest = hashlib.md5(data).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                data = http.request("GET", src).data  # downloaded a second time to save it
                try:
                    image = Image.open(io.BytesIO(data)).convert("RGBA")
                except Exception:
                    continue
                path = folder / f"{digest}.png"
                image.save(path)
                rows.append({"file": path.name, "title": title})
            time.sleep(0)  # the seed sleeps 1 s here
    finally:
        browser.quit()
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return {"pages": loaded, "images": len(rows)}


def crawl_site():
    """tests/crawl_site.py of this checkout (whatever emoji_ldm is on the path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_crawl_site", REPO / "tests" / "crawl_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CrawlSite


def page_times(stats: dict) -> dict:
    """Our pages' own seconds (load and settle, from the shard records): median and total."""
    import statistics

    seconds = list(stats.get("page_seconds", {}).values())  # not kept by older commits
    return {"pages": len(seconds), "median_s": round(statistics.median(seconds), 3) if seconds else None,
            "sum_s": round(sum(seconds), 2)}


def ours_once(site, work: Path, pages: int, i: int, workers: int = 2, shard_pages: int = 10) -> dict:
    from emoji_ldm.crawl.crawler import CrawlConfig, crawl

    profile = work / "site.yaml"
    profile.write_text(site.profile_yaml())
    seconds, (crawled, stats) = timed(crawl, CrawlConfig(profile=str(profile), tag="Blobs", out=str(work / f"ours-{i}"),
                                                         pages=f"1-{pages + 10}", workers=workers,
                                                         shard_pages=shard_pages,
                                                         rate_per_host=0))
    n = stats["pages_ok"] + 1
    out = {"pages": n, "images": crawled.added, "seconds": seconds, "pages_seconds": stats["pages_seconds"],
           "page_times": page_times(stats)}
    print(f"ours: {n} pages, {crawled.added} images in {seconds:.1f} s = {n / seconds:.2f} pages/s, "
          f"{crawled.added / seconds:.1f} images/s (pages stage {stats['pages_seconds']:.1f} s; "
          f"pages {out['page_times']})", flush=True)
    return out


def seed_once(site, work: Path, pages: int, i: int) -> dict:
    seconds, seed = timed(seed_crawl, site, pages, work / f"seed-{i}")
    print(f"seed: {seed['pages']} pages, {seed['images']} images in {seconds:.1f} s = "
          f"{seed['pages'] / seconds:.2f} pages/s, {seed['images'] / seconds:.1f} images/s", flush=True)
    return {**seed, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--per-page", type=int, default=24)
    parser.add_argument("--hydrate", action="store_true", help="items arrive after load, as on a Next.js page")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, interleaved")
    parser.add_argument("--skip-seed", action="store_true", help="ours alone (a bisect)")
    parser.add_argument("--workers", type=int, default=2, help="ours' browsers (crawl --workers)")
    parser.add_argument("--shard-pages", type=int, default=10, help="ours' pages per shard (crawl --shard-pages)")
    parser.add_argument("--cold", action="store_true",
                        help="ours' first run starts Ray (by default Ray is started before the timed runs, as a crawl "
                             "submitted to a running cluster joins its head; its start is recorded apart)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray_start_s = None
    if not args.cold:
        from emoji_ldm.runtime.connect import ensure_ray

        ray_start_s, _ = timed(ensure_ray)
        print(f"Ray started in {ray_start_s:.1f} s, before the timed runs", flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    site = crawl_site()(pages=args.pages, per_page=args.per_page, slow_page=0, flaky_page=0, hydrate=args.hydrate)
    results, summary = {"pages": args.pages, "per_page": args.per_page, "hydrate": args.hydrate,
                        "workers": args.workers, "shard_pages": args.shard_pages,
                        "ray_running": not args.cold, "ray_start_s": ray_start_s}, []
    runs = {"ours": lambda i: ours_once(site, work, args.pages, i, args.workers, args.shard_pages)}
    if not args.skip_seed:
        runs["seed"] = lambda i: seed_once(site, work, args.pages, i)
    try:
        runs = repeat(runs, args.repeat, alternate=True)
    finally:
        site.stop()
    results.update(runs)
    ours, seed = runs["ours"], runs.get("seed")
    if seed and all(s["images"] for s in seed):
        for what in ("pages", "images"):
            ratios = [(o[what] / o["seconds"]) / (s[what] / s["seconds"]) for o, s in zip(ours, seed)]
            print(f"ratio ours/seed, {what}/s: {', '.join(f'{r:.2f}x' for r in ratios)}", flush=True)
    elif seed:
        print(f"the seed's crawler found no images ({seed[0]['pages']} page(s) read); ours found "
              f"{ours[0]['images']}", flush=True)
    if seed:
        summary = [row("crawl", f"{what}/s{', hydrating' if args.hydrate else ''}",
                       [o[what] / o["seconds"] for o in ours], [s[what] / s["seconds"] for s in seed], f"{what}/s",
                       ">= 5") for what in ("pages", "images") if what == "pages" or all(s["images"] for s in seed)]
    ray = ("ours' first run starts Ray" if args.cold else
           f"ours joins a Ray started before the runs ({ray_start_s:.1f} s, not in ours' time)")
    write_record("crawl", results, summary, about=f"a local imitation of discords.com, {args.pages} pages of "
                 f"{args.per_page}{' (hydrating)' if args.hydrate else ''}; {ray}; peer: the seed's sequential "
                 "crawler.")


if __name__ == "__main__":
    main()
