"""The crawler against a local imitation of discords.com, with real Chromium on 2 Ray actors."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.crawl_site import CrawlSite


@pytest.fixture
def site():
    s = CrawlSite()
    yield s
    s.stop()


@pytest.mark.s3
def test_crawl_into_s3(s3_server, ray_local, site, tmp_path):
    """First in the module: the S3 variables must be set before the module's Ray starts its workers."""
    from emoji_ldm.crawl.crawler import CrawlConfig, crawl
    from emoji_ldm.store.delta import open_table

    s3_server.client().create_bucket(Bucket="crawls")
    profile = tmp_path / "testsite.yaml"
    profile.write_text(site.profile_yaml())
    summary, stats = crawl(CrawlConfig(profile=str(profile), tag="Blobs", out="s3://crawls/blobs", pages="1-3",
                                       workers=2, shard_pages=2, rate_per_host=0, backoff_s=0.2))
    assert summary.added == 3 * site.per_page and stats["pages_ok"] == 3
    rows = open_table("s3://crawls/blobs").to_pyarrow_table(columns=["source", "page_url"]).to_pylist()
    assert len(rows) == 3 * site.per_page and all(r["source"] == "crawl:testsite/Blobs" for r in rows)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="crawls")["Contents"]]
    assert any("_emoji_ldm/crawl/testsite/Blobs/shard-" in k for k in keys)  # the shard stats, for resuming


def test_crawl_test_site_end_to_end(ray_local, site, tmp_path):
    from deltalake import DeltaTable

    from emoji_ldm.crawl.crawler import CrawlConfig, crawl

    profile = tmp_path / "testsite.yaml"
    profile.write_text(site.profile_yaml())
    out = str(tmp_path / "crawled")
    summary, stats = crawl(CrawlConfig(profile=str(profile), tag="Blobs", out=out, pages="1-20", workers=2,
                                       shard_pages=2, rate_per_host=0, backoff_s=0.2))
    assert stats["last_page"] == 7 and stats["pages_ok"] == 6 and stats["pages_failed"] == 0
    assert site.hits["/emoji-list/tag/Blobs?page=3"] == 2  # the 500 was retried
    assert not any(f"page={p}" in k for k in site.hits for p in range(10, 21))  # nothing far past the end

    rows = DeltaTable(out).to_pyarrow_table().to_pylist()
    assert {r["source_url"] for r in rows} == site.expected_images()  # unwrapped, each image once
    assert all("_next" not in r["source_url"] for r in rows)
    assert all(r["source"] == "crawl:testsite/Blobs" and r["tag"] == "Blobs" for r in rows)
    assert all(r["page_url"].startswith(site.base + "/emoji-list/tag/Blobs?page=") for r in rows)
    assert summary.rejected == {"decode": 1} or sum(summary.rejected.values()) == 1, summary.rejected
    assert summary.added == len(site.names)
    webp = [r for r in rows if r["source_url"].endswith(".webp")]
    assert webp and all(r["width"] == 64 for r in rows)


def test_crawl_bad_input(site, tmp_path):
    good = tmp_path / "testsite.yaml"
    good.write_text(site.profile_yaml())
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text('{"name": "x", "url": "http://127.0.0.1:9/{page}", "wait_for": "a", "item": "b"}')
    private = tmp_path / "private.yaml"
    private.write_text(site.profile_yaml(url=site.base + "/private/{tag}?page={page}"))
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(site.profile_yaml(url="http://127.0.0.1:9/tag/{tag}?page={page}"))
    cases = [
        (["--profile", "nosuchsite", "--tag", "Blobs"], "unknown profile 'nosuchsite'"),
        (["--profile", str(malformed), "--tag", "Blobs"], "missing image"),
        (["--profile", str(good), "--tag", "Blobs", "--pages", "5-1"], "runs backwards"),
        (["--profile", str(unreachable), "--tag", "Blobs"], "cannot reach 127.0.0.1:9"),
        (["--profile", str(private), "--tag", "Blobs"], "robots.txt disallows"),
    ]
    for args, message in cases:
        result = run_cli("crawl", *args, "--out", str(tmp_path / "out"), timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_crawl_interrupted_halfway_resumes_without_duplicates(ray_local, site, tmp_path, monkeypatch):
    from deltalake import DeltaTable

    from emoji_ldm.crawl.crawler import CrawlConfig, crawl
    from emoji_ldm.store import artifacts

    profile = tmp_path / "testsite.yaml"
    profile.write_text(site.profile_yaml())
    out = str(tmp_path / "crawled")
    config = CrawlConfig(profile=str(profile), tag="Blobs", out=out, pages="1-20", workers=2, shard_pages=1,
                         rate_per_host=0, backoff_s=0.2)

    # Ctrl-C in the middle of the pages: two shards have finished and recorded their stats
    real_write_json, calls = artifacts.write_json, []

    def interrupted(uri, obj):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(uri)
        return real_write_json(uri, obj)

    monkeypatch.setattr(artifacts, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        crawl(config)
    monkeypatch.undo()
    done_pages = [int(u.rsplit("-", 1)[1].split(".")[0]) for u in calls]
    loads = {p: site.hits[f"/emoji-list/tag/Blobs?page={p}"] for p in done_pages}

    summary, stats = crawl(config)  # the same crawl again: it continues
    assert all(site.hits[f"/emoji-list/tag/Blobs?page={p}"] == n for p, n in loads.items())  # not read again
    assert summary.added == len(site.names) and stats["last_page"] == 7
    rows = DeltaTable(out).to_pyarrow_table(columns=["id", "source_url"]).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == len({r["source_url"] for r in rows}) == len(site.names)

    again, stats = crawl(config)  # nothing new: only the image rejected before is tried again; no new version
    assert again.added == 0 and stats["new_images"] == 1 and again.version is None


def test_a_page_that_never_renders_is_recorded_as_failed(ray_local, tmp_path):
    from emoji_ldm.crawl.crawler import CrawlConfig, crawl

    site = CrawlSite(pages=3, per_page=2, slow_page=0, flaky_page=0, dead_page=2)
    try:
        profile = tmp_path / "testsite.yaml"
        profile.write_text(site.profile_yaml(page_timeout_s=1))
        summary, stats = crawl(CrawlConfig(profile=str(profile), tag="Blobs", out=str(tmp_path / "out"),
                                           pages="1-10", workers=2, shard_pages=1, rate_per_host=0, retries=1,
                                           backoff_s=0.1))
    finally:
        site.stop()
    assert stats["pages_failed"] == 1 and stats["pages_ok"] == 2 and stats["last_page"] == 4
    (url, error), = stats["failed_pages"].items()
    assert url.endswith("page=2") and error.startswith("timeout") and site.hits["/emoji-list/tag/Blobs?page=2"] == 2
    assert summary.added == 5  # pages 1 and 3, plus page 3's repeat of page 2's first image
