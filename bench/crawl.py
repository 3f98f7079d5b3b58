"""Crawling benchmark: the seed's sequential crawler vs `emoji-ldm crawl`, same local site, one run.

The site is the test suite's imitation of discords.com (`tests/crawl_site.py`), on 127.0.0.1, with
--pages pages of --per-page Twemoji each (no slow or failing pages here).

  seed: one Chromium, a per-page loop that reads each item with its own WebDriver calls, re-processes
        the whole list of items seen so far on every page, downloads every image once to hash it and
        again to save it, converts WebP, writes PNGs and metadata.csv; its 1 s sleep per page set to 0.
  ours: `crawl()` with 2 browser actors, 5-page shards, politeness limits lifted (--rate 0), then
        the concurrent download + ingest into a new Delta version.

    python bench/crawl.py [--pages 40] [--per-page 24] [--hydrate]

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

from common import REPO, row, timed, write_record

sys.path.insert(0, str(REPO))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--per-page", type=int, default=24)
    parser.add_argument("--hydrate", action="store_true", help="items arrive after load, as on a Next.js page")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from emoji_ldm.crawl.crawler import CrawlConfig, crawl
    from tests.crawl_site import CrawlSite

    work = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    site = CrawlSite(pages=args.pages, per_page=args.per_page, slow_page=0, flaky_page=0, hydrate=args.hydrate)
    results, summary = {"pages": args.pages, "per_page": args.per_page, "hydrate": args.hydrate}, []
    try:
        seed_s, seed = timed(seed_crawl, site, args.pages, work / "seed")
        print(f"seed: {seed['pages']} pages, {seed['images']} images in {seed_s:.1f} s = "
              f"{seed['pages'] / seed_s:.2f} pages/s, {seed['images'] / seed_s:.1f} images/s", flush=True)

        profile = work / "site.yaml"
        profile.write_text(site.profile_yaml())
        ours_s, (crawled, stats) = timed(crawl, CrawlConfig(profile=str(profile), tag="Blobs", out=str(work / "ours"),
                                                            pages=f"1-{args.pages + 10}", workers=2, shard_pages=5,
                                                            rate_per_host=0))
        pages, added = stats["pages_ok"] + 1, crawled.added
        print(f"ours: {pages} pages, {added} images in {ours_s:.1f} s = {pages / ours_s:.2f} pages/s, "
              f"{added / ours_s:.1f} images/s (pages stage {stats['pages_seconds']:.1f} s)", flush=True)
        results.update(seed={**seed, "seconds": seed_s}, ours={"pages": pages, "images": added, "seconds": ours_s,
                                                                 "pages_seconds": stats["pages_seconds"]})
        if seed["images"]:
            print(f"ratio ours/seed: pages/s {(pages / ours_s) / (seed['pages'] / seed_s):.2f}x, images/s "
                  f"{(added / ours_s) / (seed['images'] / seed_s):.2f}x")
        else:
            print(f"the seed's crawler found no images ({seed['pages']} page(s) read); ours found {added}")
        summary = [row("crawl", what, mine / ours_s, theirs / seed_s, what, ">= 5") for what, mine, theirs in
                   (("pages/s", pages, seed["pages"]), ("images/s", added, seed["images"]))]
    finally:
        site.stop()
    write_record("crawl", results, summary, about=f"a local imitation of discords.com, {args.pages} pages of "
                 f"{args.per_page}{' (hydrating)' if args.hydrate else ''}; peer: the seed's sequential crawler.")


if __name__ == "__main__":
    main()
