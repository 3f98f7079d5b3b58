"""Crawling emoji sites (work in progress, issue 6).

So far: site profiles (`profiles.py`, the built-in `discords` profile) with
page ranges and proxied-image unwrapping. The sharded browser crawl, the
download stage and `emoji-ldm crawl` are not built yet.
"""
