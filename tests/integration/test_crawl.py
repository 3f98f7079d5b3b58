"""The crawler against a local imitation of discords.com, with real Chromium on 2 Ray actors."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, run_cli
from tests.crawl_site import CrawlSite


@pytest.fixture
def site():
    s = CrawlSite()
    yield s
    s.stop()


@pytest.mark.s3
def test_crawl_test_site_end_to_end_into_s3(s3_server, ray_local, site, tmp_path):
    """The whole test site (7 pages: a flaky one, a slow one, the empty page after the last) into a table on S3,
    with the shard stats a re-run resumes from beside it."""
    from emoji_ldm.crawl.crawler import CrawlConfig, crawl
    from emoji_ldm.store.delta import open_table

    s3_server.client().create_bucket(Bucket="crawls")
    profile = tmp_path / "testsite.yaml"
    profile.write_text(site.profile_yaml())
    out = "s3://crawls/blobs"
    summary, stats = crawl(CrawlConfig(profile=str(profile), tag="Blobs", out=out, pages="1-20", workers=2,
                                       shard_pages=2, rate_per_host=0, backoff_s=0.2))
    assert stats["last_page"] == 7 and stats["pages_ok"] == 6 and stats["pages_failed"] == 0
    assert site.hits["/emoji-list/tag/Blobs?page=3"] == 2  # the 500 was retried
    assert not any(f"page={p}" in k for k in site.hits for p in range(10, 21))  # nothing far past the end

    rows = open_table(out).to_pyarrow_table().to_pylist()
    assert {r["source_url"] for r in rows} == site.expected_images()  # unwrapped, each image once
    assert all("_next" not in r["source_url"] for r in rows)
    assert all(r["source"] == "crawl:testsite/Blobs" and r["tag"] == "Blobs" for r in rows)
    assert all(r["page_url"].startswith(site.base + "/emoji-list/tag/Blobs?page=") for r in rows)
    assert summary.rejected == {"decode": 1} or sum(summary.rejected.values()) == 1, summary.rejected
    assert summary.added == len(site.names) == len(rows)
    webp = [r for r in rows if r["source_url"].endswith(".webp")]
    assert webp and all(r["width"] == 64 for r in rows)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="crawls")["Contents"]]
    assert any("_emoji_ldm/crawl/testsite/Blobs/shard-" in k for k in keys)  # the shard stats, for resuming


def test_crawl_bad_input(site, tmp_path, cli_in_process):
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
        code, err = cli_in_process("crawl", *args, "--out", str(tmp_path / "out"))
        assert code == 2 and message in err, (args, err)


def _crawler_browsers() -> list[str]:
    """Command lines of the Chromium processes the crawler started (their profile folders are named so)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"chromium") and any(b"emoji-ldm-chromium-" in a for a in args):
            found.append(b" ".join(args)[:200].decode(errors="replace"))
    return found


def test_crawl_interrupted_halfway_resumes_without_duplicates(ray_local, tmp_path):
    """Ctrl-C in the middle of the pages (the CLI, on the module's Ray): a re-run skips the finished shards."""
    from deltalake import DeltaTable

    from emoji_ldm.crawl.crawler import CrawlConfig, crawl

    site = CrawlSite(hold_from=3)  # pages 3 and up wait until released: the crawl is stopped there
    try:
        profile = tmp_path / "testsite.yaml"
        profile.write_text(site.profile_yaml())
        out = str(tmp_path / "crawled")
        stats_dir = Path(out) / "_emoji_ldm" / "crawl" / "testsite" / "Blobs"
        args = ["crawl", "--profile", str(profile), "--tag", "Blobs", "--out", out, "--pages", "1-10",
                "--workers", "2", "--shard-pages", "1", "--rate", "0"]
        # SIGINT as the default: a suite started in the background of a non-interactive shell passes its
        # children SIGINT ignored (POSIX), and the CLI would then, rightly, not stop on Ctrl-C
        proc = subprocess.Popen([str(VENV_BIN / "emoji-ldm"), *args],
                                env={**os.environ, "RAY_ADDRESS": ray_local}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while len(list(stats_dir.glob("shard-*.json"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "re-run the same command to resume" in err, err
        assert not DeltaTable.is_deltatable(out)  # nothing is committed before every shard is read
        deadline = time.monotonic() + 30  # and its browsers go with it: no Chromium outlives the crawl
        while _crawler_browsers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _crawler_browsers(), _crawler_browsers()

        done_pages = [int(f.stem.rsplit("-", 1)[1]) for f in stats_dir.glob("shard-*.json")]
        assert sorted(done_pages) == [1, 2]
        loads = {p: site.hits[f"/emoji-list/tag/Blobs?page={p}"] for p in done_pages}
        site.release.set()
        config = CrawlConfig(profile=str(profile), tag="Blobs", out=out, pages="1-10", workers=2, shard_pages=1,
                             rate_per_host=0, backoff_s=0.2)
        summary, stats = crawl(config)  # the same crawl again: it continues
        assert all(site.hits[f"/emoji-list/tag/Blobs?page={p}"] == n for p, n in loads.items())  # not read again
        assert summary.added == len(site.names) and stats["last_page"] == 7
        rows = DeltaTable(out).to_pyarrow_table(columns=["id", "source_url"]).to_pylist()
        assert len(rows) == len({r["id"] for r in rows}) == len({r["source_url"] for r in rows}) == len(site.names)

        again, stats = crawl(config)  # nothing new: only the image rejected before is tried again; no new version
        assert again.added == 0 and stats["new_images"] == 1 and again.version is None
        deadline = time.monotonic() + 30  # the browsers of all three crawls are gone
        while _crawler_browsers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _crawler_browsers(), _crawler_browsers()
    finally:
        site.release.set()
        site.stop()


def test_a_page_that_never_renders_is_recorded_as_failed(ray_local, tmp_path):
    from emoji_ldm.crawl.crawler import CrawlConfig, crawl

    site = CrawlSite(pages=3, per_page=2, slow_page=0, flaky_page=0, dead_page=2)
    try:
        profile = tmp_path / "testsite.yaml"
        # 3 s: the dead page never renders, and each attempt must reach the site within it (at 1 s, on a 2-core
        # machine 98% busy, a retry timed out in Chromium before its request went out)
        profile.write_text(site.profile_yaml(page_timeout_s=3))
        summary, stats = crawl(CrawlConfig(profile=str(profile), tag="Blobs", out=str(tmp_path / "out"),
                                           pages="1-10", workers=2, shard_pages=1, rate_per_host=0, retries=1,
                                           backoff_s=0.1))
    finally:
        site.stop()
    assert stats["pages_failed"] == 1 and stats["pages_ok"] == 2 and stats["last_page"] == 4
    (url, error), = stats["failed_pages"].items()
    assert url.endswith("page=2") and error.startswith("timeout") and site.hits["/emoji-list/tag/Blobs?page=2"] == 2
    assert summary.added == 5  # pages 1 and 3, plus page 3's repeat of page 2's first image


def test_a_hydrating_page_is_read_once_its_items_arrive(ray_local, tmp_path):
    """Container in the HTML, items fetched 0.5-1 s later and streamed in: every item, the end at the empty page."""
    from deltalake import DeltaTable

    from emoji_ldm.crawl.crawler import CrawlConfig, crawl

    site = CrawlSite(pages=3, per_page=5, slow_page=0, flaky_page=0, hydrate=True)
    try:
        profile = tmp_path / "testsite.yaml"
        profile.write_text(site.profile_yaml())  # the default settle_s
        out = str(tmp_path / "out")
        summary, stats = crawl(CrawlConfig(profile=str(profile), tag="Blobs", out=out, pages="1-10", workers=2,
                                           shard_pages=2, rate_per_host=0, backoff_s=0.2))
    finally:
        site.stop()
    assert stats["last_page"] == 4 and stats["pages_ok"] == 3 and stats["pages_failed"] == 0
    assert stats["items"] == sum(len(site.page_items(p)) for p in (1, 2, 3))
    assert summary.added == len(site.names)
    assert {r["source_url"] for r in DeltaTable(out).to_pyarrow_table(columns=["source_url"]).to_pylist()} == \
        site.expected_images()


def test_the_empty_marker_ends_the_tag_without_waiting_and_few_pages_warn(ray_local, tmp_path):
    from emoji_ldm.crawl.crawler import CrawlConfig, crawl, report

    site = CrawlSite(pages=2, per_page=3, slow_page=0, flaky_page=0, hydrate=True)
    try:
        profile = tmp_path / "testsite.yaml"
        profile.write_text(site.profile_yaml(settle_s=60, empty_marker="p.no-emoji"))
        result = crawl(CrawlConfig(profile=str(profile), tag="Blobs", out=str(tmp_path / "out"), pages="1-10",
                                   workers=1, rate_per_host=0, backoff_s=0.2))
    finally:
        site.stop()
    summary, stats = result
    assert stats["last_page"] == 3 and stats["pages_ok"] == 2 and summary.added == len(site.names)
    assert stats["page_seconds"][3] < 10  # the marker, not the 60 s grace for a page without items
    assert "crawl: WARNING: items on only 2 page(s) of 1-10 (the tag ends at page 3)" in report(result)


def test_a_crawl_whose_first_page_yields_nothing_exits_2(ray_local, site, tmp_path):
    """Wrong item selector: exit 2 naming the page and the selectors; a first page that never renders too."""
    from emoji_ldm.crawl.crawler import CrawlConfig, crawl
    from emoji_ldm.errors import UserError

    profile = tmp_path / "wrong.yaml"
    profile.write_text(site.profile_yaml(item="div.LQY5mtmC div.no-such-item", settle_s=0.5))
    out = tmp_path / "out"
    result = run_cli("crawl", "--profile", str(profile), "--tag", "Blobs", "--out", str(out), "--pages", "1-10",
                     "--rate", "0", env={"RAY_ADDRESS": ray_local}, timeout=180)
    assert result.returncode == 2, result.stderr
    line = f"emoji-ldm: error: the first page {site.base}/emoji-list/tag/Blobs?page=1 has no items"
    assert line in result.stderr, result.stderr
    assert "'div.LQY5mtmC div.no-such-item'" in result.stderr and "'div.FS5UE28h.container'" in result.stderr
    assert not (out / "_delta_log").exists()

    dead = CrawlSite(pages=2, per_page=2, slow_page=0, flaky_page=0, dead_page=1)
    try:
        profile.write_text(dead.profile_yaml(page_timeout_s=1))
        with pytest.raises(UserError, match=r"the first page .*page=1 did not render after 2 attempt\(s\): timeout"):
            crawl(CrawlConfig(profile=str(profile), tag="Blobs", out=str(out), pages="1-4", workers=1,
                              rate_per_host=0, retries=1, backoff_s=0.1))
    finally:
        dead.stop()


def test_the_step_after_the_pages_is_sized_by_their_rows_not_the_page_range(ray_local):
    """One block for a small crawl, a hash repartition on the URL past 16 MiB; either way one row per image URL
    (its lowest page) up to the tag's end. The page range (1-1000 by default) no longer sizes it: 25 hash
    partitions for a 40-page tag cost about 5 s after its last page."""
    import ray
    import ray.data

    from emoji_ldm.crawl.crawler import _after_pages
    from emoji_ldm.crawl.shards import CrawlState

    state = ray.remote(num_cpus=0)(CrawlState).remote(3, [])  # every shard done, the tag ends at page 3
    for image_bytes, blocks in ((1_000, 1), (600_000, 2)):  # 40 rows: 40 KB, or 24 MB
        rows = [{"source_url": f"http://x/{i % 10}.png", "page": 1 + i // 10, "image": bytes(image_bytes)}
                for i in range(40)]  # 10 URLs, each on pages 1-4
        pages = ray.data.from_items(rows[::-1], override_num_blocks=8)
        kept = _after_pages(pages, True, "unused", state).materialize()
        assert kept.num_blocks() == blocks
        out = sorted(kept.select_columns(["source_url"]).take_all(), key=lambda r: r["source_url"])
        assert [r["source_url"] for r in out] == [f"http://x/{i}.png" for i in range(10)]
    ray.kill(state)
