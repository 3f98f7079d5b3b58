"""Sources: listing (twemoji, noto, openmoji, dir:, urls:, synthetic:) as Ray Datasets on the session's Ray, a
build of all three emoji sets, and fetching with retries against a local server."""

import hashlib
import io

import pandas as pd
import pytest
from deltalake import DeltaTable
from PIL import Image

from emoji_ldm.caption.metadata import caption_batch
from emoji_ldm.errors import UserError
from emoji_ldm.ingest.build import BuildConfig, build_dataset
from emoji_ldm.sources import FetchConfig, open_source, source_dataset
from emoji_ldm.sources.base import FetchError, fetch_bytes, fetch_url, make_pool
from emoji_ldm.sources.synthetic import describe as synthetic_title
from emoji_ldm.store.delta import history
from tests.conftest import png_bytes


def items(spec: str, limit: int | None = None) -> list[dict]:
    """A small source's items, read back for the test (never done by the library)."""
    return source_dataset(spec, limit).take(10_000)


def test_limit_and_unknown_source(ray_local):
    assert len(items("twemoji", limit=5)) == 5
    with pytest.raises(UserError, match="unknown source 'ftp:x'"):
        open_source("ftp:x")
    with pytest.raises(UserError, match="positive"):
        source_dataset("twemoji", limit=0)


def test_one_version_holds_all_three_styles(ray_local, tmp_path):
    out = str(tmp_path / "ds")
    summary = build_dataset(BuildConfig(source="twemoji+noto+openmoji", out=out, limit=9))
    assert (summary.version, summary.added) == (0, 9)
    assert history(out)[-1]["meta"]["source"] == "twemoji+noto+openmoji"
    rows = DeltaTable(out).to_pyarrow_table().to_pylist()
    assert sorted(r["source"] for r in rows) == ["noto"] * 3 + ["openmoji"] * 3 + ["twemoji"] * 3
    assert len({r["id"] for r in rows}) == 9
    for r in rows:
        with Image.open(io.BytesIO(r["image"])) as im:
            assert (im.mode, im.size) == ("RGBA", (64, 64)) and im.getpixel((0, 0))[3] == 0, r["title"]
    # the first emoji of each set in code-point order: the same CLDR title, drawn three ways
    by_style = {s: sorted(r["title"] for r in rows if r["source"] == s) for s in ("noto", "openmoji")}
    assert by_style["noto"] == by_style["openmoji"] == ["keycap #", "keycap *", "keycap 0"]
    captions = caption_batch({k: [r[k] for r in rows] for k in ("id", "image", "title", "tag", "source")})
    styled = {r["source"]: c for r, c in zip(rows, captions["caption"])}
    assert "noto style" in styled["noto"] and "openmoji style" in styled["openmoji"]
    assert "style" not in styled["twemoji"]
    # a second build of the same sets adds nothing: the ids are content hashes
    again = build_dataset(BuildConfig(source="twemoji+noto+openmoji", out=out, limit=9))
    assert again.added == 0 and again.duplicates_in_table == 9


def test_synthetic_source_is_distinct_deterministic_and_described(ray_local):
    rows = items("synthetic:300:7")
    assert len(rows) == 300 and len({r["locator"] for r in rows}) == 300
    assert {r["source"] for r in rows} == {"synthetic:300:7"} and all(r["title"] for r in rows)
    pictures = [fetch_bytes(r["locator"], FetchConfig()) for r in rows]
    assert len({hashlib.sha1(p).hexdigest() for p in pictures}) == 300  # N distinct images
    assert fetch_bytes("synthetic:7:5", FetchConfig()) == fetch_bytes("synthetic:7:5", FetchConfig())
    assert synthetic_title(7, 5) == synthetic_title(7, 5) and synthetic_title(7, 5) != synthetic_title(8, 5)
    assert len(items("synthetic:1000", limit=20)) == 20
    for bad in ("synthetic:", "synthetic:x", "synthetic:0", "synthetic:5:-1", "synthetic:1:2:3"):
        with pytest.raises(UserError, match="synthetic"):
            open_source(bad)


def test_dir_with_metadata_csv(ray_local, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b_c.png").write_bytes(png_bytes())
    (tmp_path / ".hidden.png").write_bytes(png_bytes())
    (tmp_path / "metadata.csv").write_text(
        "file_name,image_url,image_title,tag,prompt\n"
        "a.png,https://example.org/a.webp,blobcat,Blobs,a cat blob\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(png_bytes())
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "e.png").write_bytes(png_bytes())
    found = {r["locator"].rsplit("/", 1)[1]: r for r in items(f"dir:{tmp_path}")}
    assert set(found) == {"a.png", "b_c.png", "d.png"}
    a = found["a.png"]
    assert (a["title"], a["tag"], a["caption"], a["source_url"]) == (
        "blobcat", "Blobs", "a cat blob", "https://example.org/a.webp")
    assert found["b_c.png"]["title"] == "b c" and found["b_c.png"]["caption"] is None
    assert found["d.png"]["source_url"] == str((tmp_path / "sub" / "d.png").resolve())


def test_url_lists(ray_local, tmp_path):
    txt = tmp_path / "u.txt"
    txt.write_text("# comment\nhttp://127.0.0.1:1/a.png\n\nhttps://example.org/b.png\n")
    assert sorted(r["locator"] for r in items(f"urls:{txt}")) == [
        "http://127.0.0.1:1/a.png", "https://example.org/b.png"]
    csv = tmp_path / "u.csv"
    csv.write_text("image_url,image_title,tag\nhttp://h/a.png,smile,Faces\n")
    (item,) = items(f"urls:{csv}")
    assert (item["title"], item["tag"], item["caption"]) == ("smile", "Faces", None)
    pq = tmp_path / "u.parquet"
    pd.DataFrame({"url": ["http://h/1.png", "http://h/2.png"], "title": ["one", "two"]}).to_parquet(pq)
    assert sorted(r["title"] for r in items(f"urls:{pq}")) == ["one", "two"]


def test_fetch_retries_on_500_then_succeeds(http_site):
    http_site.files["/a.png"] = png_bytes()
    config = FetchConfig(retries=2, backoff_s=0.01)
    data = fetch_url(make_pool(config), http_site.url("flaky/a.png"), config)
    assert data == http_site.files["/a.png"]
    assert http_site.hits["/flaky/a.png"] == 2


def test_fetch_does_not_retry_404(http_site):
    with pytest.raises(FetchError) as e:
        fetch_url(make_pool(FetchConfig(backoff_s=0.01)), http_site.url("status/404"), FetchConfig(backoff_s=0.01))
    assert e.value.reason == "http_error" and e.value.detail == "HTTP 404"
    assert http_site.hits["/status/404"] == 1


def test_fetch_gives_up_after_retries(http_site):
    with pytest.raises(FetchError, match="HTTP 503"):
        config = FetchConfig(retries=2, backoff_s=0.01)
        fetch_url(make_pool(config), http_site.url("status/503"), config)
    assert http_site.hits["/status/503"] == 3


def test_fetch_times_out(http_site):
    http_site.files["/a.png"] = png_bytes()
    http_site.slow_s = 2.0
    config = FetchConfig(timeout_s=0.3, retries=1, backoff_s=0.01)
    with pytest.raises(FetchError) as e:
        fetch_url(make_pool(config), http_site.url("slow/a.png"), config)
    assert e.value.reason == "fetch_failed" and "2 attempts" in e.value.detail


def test_fetch_caps_size(http_site):
    http_site.files["/big.bin"] = b"x" * 5000
    with pytest.raises(FetchError) as e:
        fetch_url(make_pool(FetchConfig(max_bytes=1000)), http_site.url("big.bin"), FetchConfig(max_bytes=1000))
    assert e.value.reason == "too_large_bytes"
