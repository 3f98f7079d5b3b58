"""The crawler's SSRF guard (crawl/guard.py): image URLs that a third-party page names are fetched only from public
addresses; the metadata service, cluster and loopback addresses, files and names that do not resolve are dropped
before any download. An operator's own local site (a page on a literal IP or localhost naming its own host) is
still crawled."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from emoji_ldm.crawl.guard import may_fetch

PAGE = "https://emoji.example/tag/blobs?page=1"


def resolver(table: dict[str, list[str]]):
    def resolve(host, port, proto=0):
        if host not in table:
            raise socket.gaierror("no such name")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, proto, "", (a, 0))
                for a in table[host]]
    return resolve


NAMES = resolver({"cdn.example": ["93.184.216.34"], "rebound.example": ["10.0.0.7"],
                  "mixed.example": ["93.184.216.34", "169.254.169.254"], "v6.example": ["2606:4700::1111"],
                  "mapped.example": ["::ffff:127.0.0.1"], "ula.example": ["fd00::1"]})


@pytest.mark.parametrize("url", ["https://cdn.example/a.png", "http://93.184.216.34/a.png",
                                 "https://v6.example/a.png", "https://[2606:4700::1111]/a.png"])
def test_public_image_urls_are_fetched(url):
    assert may_fetch(url, PAGE, NAMES)


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:8265/api/jobs/", "http://10.0.0.7/x.png",
    "http://[::1]/x.png", "http://[fd00::1]/x.png", "http://[::ffff:169.254.169.254]/x.png",
    "https://rebound.example/x.png", "https://mixed.example/x.png", "https://mapped.example/x.png",
    "https://ula.example/x.png", "https://nowhere.example/x.png", "file:///etc/passwd", "/etc/passwd",
    "ftp://cdn.example/a.png", "http:///x.png", "http://[oops/x.png",
])
def test_internal_addresses_files_and_unresolvable_names_are_not(url):
    assert not may_fetch(url, PAGE, NAMES)


def test_an_operators_local_site_may_name_its_own_host_only():
    assert may_fetch("http://127.0.0.1:8000/img/a.png", "http://127.0.0.1:8000/tag/x?page=1", NAMES)
    assert may_fetch("http://localhost:8000/a.png", "http://localhost:8000/p", NAMES)
    assert not may_fetch("http://169.254.169.254/", "http://127.0.0.1:8000/p", NAMES)
    assert not may_fetch("https://rebound.example/a.png", "https://rebound.example/p", NAMES)  # a name: resolved


def test_a_shard_never_downloads_a_blocked_image(monkeypatch):
    """The guard sits in the shard's download thread, before the build's `ingest_batch`."""
    from emoji_ldm.crawl import shards
    from emoji_ldm.crawl.page_reader import ITEM_SCHEMA
    from emoji_ldm.ingest import tasks

    asked = []
    monkeypatch.setattr(tasks, "ingest_batch", lambda items, image, fetch: asked.append(
        items.column("locator").to_pylist()) or items.select(["locator"]))
    rows = [{"locator": url, "page_url": "https://site.example/p", "page": 1, "source": "s", "title": "", "tag": "t"}
            for url in ("http://169.254.169.254/latest/meta-data/", "file:///etc/passwd", "http://93.184.216.34/a.png")]
    with ThreadPoolExecutor(1) as pool:
        fetch = shards.ShardFetch(None, None, pool)
        fetch.add(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA))
        fetch.futures[0].result()
    assert asked == [["http://93.184.216.34/a.png"]]
