"""Crawling emoji sites: a tag's pages in headless Chromium, into a new dataset version.

Input: a site profile (`profiles.py`: the built-in `discords`, or a YAML file
with the page URL pattern, selectors and page range), a tag and a page range.
Output: a new version of the emoji dataset (the same rows as `dataset build`,
with `source = crawl:PROFILE/TAG` and the page each image was found on), and
per-shard stats under `_emoji_ldm/crawl/` that mark shards done for a re-run.

Pages are read in shards by a Ray Data actor pool whose actors each own one
Chromium (`browser.py`, Selenium), politely (robots.txt, a page-load rate per
host, retries), once each page has settled; the image URLs stream on into the
build's download, clean and de-duplicate stages
(`emoji_ldm.ingest.build.ingest_dataset`) in the same pipeline.

Entry point: `crawler.crawl(CrawlConfig)` (`emoji-ldm crawl`).
"""
