"""Build datasets from every source into a local Delta table with real Ray; read versions back."""

import io

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from PIL import Image

from emoji_ldm.errors import UserError
from emoji_ldm.imaging import ImageConfig
from emoji_ldm.ingest.build import BuildConfig, build_dataset
from emoji_ldm.sources import FetchConfig
from emoji_ldm.store import ops
from emoji_ldm.store.delta import history, open_table
from emoji_ldm.store.log import file_actions
from emoji_ldm.store.schema import EMOJI_SCHEMA
from emoji_ldm.store.sidecar import image_mode
from emoji_ldm.store.uri import DatasetRef
from tests.conftest import make_bad_corpus, png_bytes, run_cli


def test_twemoji_build_append_dedupe(ray_local, tmp_path, monkeypatch):
    from emoji_ldm.ingest import build

    monkeypatch.setattr(build, "LOCAL_DEDUPE_KEYS", 0)  # the cluster path: keys shuffled in a Ray Data groupby
    monkeypatch.setattr(build, "rows_per_file", lambda size: 50)  # data files stay small however big the source
    out = str(tmp_path / "ds")
    first = build_dataset(BuildConfig(source="twemoji", out=out, limit=120, message="first 120", batch_size=16))
    assert first.version == 0 and first.images_in == 120 and first.rejected == {}
    assert first.added + first.duplicates_in_build == 120
    rows = file_actions(open_table(out)).column("num_records").to_pylist()
    assert len(rows) >= 3 and max(rows) <= 50 and sum(rows) == first.added, rows

    table = DeltaTable(out).to_pyarrow_table()
    assert table.schema.names == EMOJI_SCHEMA.names
    assert table.num_rows == first.added
    row = next(r for r in table.to_pylist() if r["title"] == "mahjong red dragon")
    assert row["tag"] == "Activities" and row["source"] == "twemoji" and row["source_url"].endswith("1f004.png")
    img = Image.open(io.BytesIO(row["image"]))
    assert img.size == (64, 64) and img.mode == "RGBA" and img.getpixel((0, 0))[3] == 0
    assert image_mode(out) == "RGBA" and sum(first.alpha.values()) == first.accepted
    assert first.alpha.get("transparent", 0) >= 100, first.alpha  # Twemoji have alpha
    assert "transparent" in first.line()
    with pytest.raises(UserError, match="stores RGBA images, so --background 'white'"):
        build_dataset(BuildConfig(source="twemoji", out=out, limit=5, image=ImageConfig(background="white")))

    # A table built with --background stays RGB: an append must flatten too.
    flat = str(tmp_path / "flat")
    build_dataset(BuildConfig(source="twemoji", out=flat, limit=3, image=ImageConfig(background="white")))
    with pytest.raises(UserError, match="stores RGB images"):
        build_dataset(BuildConfig(source="twemoji", out=flat, limit=6))
    appended = build_dataset(BuildConfig(source="twemoji", out=flat, limit=6, image=ImageConfig(background="white")))
    assert appended.alpha == {"flattened": appended.accepted} and image_mode(flat) == "RGB"
    pngs = DeltaTable(flat).to_pyarrow_table().column("image").to_pylist()
    modes = {Image.open(io.BytesIO(png)).mode for png in pngs}
    assert modes == {"RGB"}

    # Appending an overlapping range adds only the new images.
    second = build_dataset(BuildConfig(source="twemoji", out=out, limit=200))
    assert second.version == 1
    assert second.duplicates_in_table >= 120 - first.duplicates_in_build
    assert DeltaTable(out).to_pyarrow_table(columns=["id"]).num_rows == first.added + second.added
    ids = DeltaTable(out).to_pyarrow_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids))

    # Nothing new: no empty version.
    third = build_dataset(BuildConfig(source="twemoji", out=out, limit=50))
    assert third.version is None and third.added == 0

    meta = history(out)[0]["meta"]
    assert meta["operation"] == "build" and meta["source"] == "twemoji" and meta["message"] == "first 120"
    assert meta["counts"]["added"] == first.added and meta["config"]["image"]["size"] == 64
    assert meta["code_version"].startswith("0.1.0")
    assert "images/s" in first.line() and "accepted" in first.line()


def test_dir_source_bad_corpus(ray_local, tmp_path):
    folder = tmp_path / "pack"
    expected = make_bad_corpus(folder)
    out = str(tmp_path / "ds")
    summary = build_dataset(BuildConfig(source=f"dir:{folder}", out=out, image=ImageConfig(size=32)))
    want_rejects = {}
    for reason in expected.values():
        if reason:
            want_rejects[reason] = want_rejects.get(reason, 0) + 1
    assert summary.rejected == want_rejects
    good = [n for n, r in expected.items() if r is None]
    table = DeltaTable(out).to_pyarrow_table()
    assert table.num_rows == summary.added == len(good)
    assert set(table.column("width").to_pylist()) == {32}
    rejects = pq.read_table(summary.rejects_uri).to_pylist()
    by_file = {r["source_url"].rsplit("/", 1)[1]: r["reason"] for r in rejects}
    assert by_file == {n: r for n, r in expected.items() if r}
    assert all(r["detail"] for r in rejects)
    assert summary.alpha == {"opaque": 5, "transparent": 2}  # accepted images by what happened to their alpha

    # --key-background through a build: a flat JPEG background becomes alpha, a busy photo stays opaque; counted
    import numpy as np

    photos = tmp_path / "photos"
    photos.mkdir()
    flat = Image.new("RGB", (48, 48), "white")
    flat.paste((220, 30, 30), (12, 12, 36, 36))
    flat.save(photos / "flat.jpg", quality=90)
    noise = np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((48, 48), Image.Resampling.BICUBIC).save(photos / "busy.jpg", quality=90)
    keyed_out = str(tmp_path / "keyed")
    keyed = build_dataset(BuildConfig(source=f"dir:{photos}", out=keyed_out,
                                      image=ImageConfig(size=32, key_background=True)))
    assert keyed.alpha == {"keyed": 1, "busy_border": 1} and keyed.added == 2
    stored = {r["source_url"].rsplit("/", 1)[1]: Image.open(io.BytesIO(r["image"]))
              for r in DeltaTable(keyed_out).to_pyarrow_table(columns=["source_url", "image"]).to_pylist()}
    assert stored["flat.jpg"].getpixel((1, 1))[3] == 0 and stored["flat.jpg"].getpixel((16, 16))[3] == 255
    assert stored["busy.jpg"].getchannel("A").getextrema() == (255, 255)  # never cut into a photo


def test_urls_source_with_misbehaving_server(ray_local, tmp_path, http_site):
    urls = []
    for i in range(6):
        http_site.files[f"/img{i}.png"] = png_bytes((40 * i, 0, 0, 255), (20 + i, 20))
        urls.append(http_site.url(f"img{i}.png"))
    http_site.files["/slow.png"] = png_bytes((0, 0, 9, 255))
    http_site.slow_s = 0.5
    urls += [http_site.url("status/404"), http_site.url("status/500"), http_site.url("flaky/img0.png"),
             http_site.url("slow/slow.png")]
    lst = tmp_path / "urls.csv"
    lst.write_text("url,title,tag\n" + "".join(f"{u},t{i},T\n" for i, u in enumerate(urls)))
    out = str(tmp_path / "ds")
    summary = build_dataset(BuildConfig(source=f"urls:{lst}", out=out,
                                        fetch=FetchConfig(retries=2, backoff_s=0.01, timeout_s=5)))
    assert summary.rejected == {"http_error": 2}
    # flaky/img0.png succeeds on retry and is a duplicate of img0.png
    assert summary.duplicates_in_build == 1 and summary.added == 7
    assert http_site.hits["/status/500"] == 3 and http_site.hits["/status/404"] == 1
    titles = set(DeltaTable(out).to_pyarrow_table(columns=["title"]).column("title").to_pylist())
    # of the two identical images the smallest source URL is kept, whatever order the tasks finish in
    assert "t9" in titles and "t8" in titles and "t0" not in titles


def test_versions_show_diff_tag_restore(ray_local, tmp_path):
    out = str(tmp_path / "ds")
    build_dataset(BuildConfig(source="twemoji", out=out, limit=30))
    build_dataset(BuildConfig(source="twemoji", out=out, limit=60))
    n0 = open_table(f"{out}@0").to_pyarrow_table(columns=["id"]).num_rows
    n1 = open_table(out).to_pyarrow_table(columns=["id"]).num_rows

    d = ops.diff(out, "0", "1")
    assert d.added == n1 - n0 and d.removed == 0 and len(d.added_sample) == 10
    assert ops.diff(out, "1", "0").removed == n1 - n0

    ops.tag(out, "small", 0)
    assert open_table(DatasetRef.parse(f"{out}@small")).version() == 0
    summary = ops.show(f"{out}@small", sheet=str(tmp_path / "sheet.png"))
    assert summary.rows == n0 and summary.version == 0
    assert Image.open(tmp_path / "sheet.png").size[0] == 8 * 128

    new = ops.restore(out, 0)
    assert new == 2
    assert open_table(out).to_pyarrow_table(columns=["id"]).num_rows == n0
    rows = ops.versions(out)
    assert [r["operation"] for r in rows] == ["build", "build", "restore"]
    assert rows[2]["rows_removed"] == n1 - n0
    assert "restore" in ops.format_versions(rows)

    with pytest.raises(UserError, match="unknown version 7"):
        open_table(f"{out}@7")
    with pytest.raises(UserError, match="unknown tag 'nope'.*small"):
        open_table(f"{out}@nope")
    with pytest.raises(UserError, match="no dataset at"):
        open_table(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="tag name"):
        ops.tag(out, "12", 0)


def test_cli_end_to_end_and_errors(ray_local, tmp_path, cli_in_process):
    """The CLI as a user runs it; errors are one line, exit 2, and leave the table unchanged. (Two of the input
    errors as a process, the whole stderr one line; the rest in this process, refused before Ray.)"""
    env = {"RAY_ADDRESS": ray_local}
    out = str(tmp_path / "ds")
    r = run_cli("dataset", "build", "--source", "twemoji", "--out", out, "--limit", "20", "--message", "cli", env=env)
    assert r.returncode == 0, r.stderr
    assert "build: 20 in, 20 accepted" in r.stdout and "version 0" in r.stdout

    r = run_cli("dataset", "versions", out)
    assert r.returncode == 0 and "cli" in r.stdout and "build" in r.stdout
    r = run_cli("dataset", "show", out, "--version", "0", "--sheet", str(tmp_path / "s.png"))
    assert r.returncode == 0 and "20 rows" in r.stdout and ", RGBA" in r.stdout and (tmp_path / "s.png").exists()
    r = run_cli("dataset", "tag", out, "v0", "0")
    assert r.returncode == 0
    r = run_cli("dataset", "diff", out, "v0", "0")
    assert r.returncode == 0 and "0 rows added, 0 rows removed" in r.stdout

    before = DeltaTable(out).version()
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("ftp://x/y.png\n")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    # a build whose every input is rejected runs the pipeline (Ray Data logs its progress on a non-tty
    # stderr), then fails with one error line and no traceback
    r = run_cli("dataset", "build", "--source", f"dir:{junk}", "--out", out, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("emoji-ldm: error: build: 1 in, 0 accepted, 1 rejected (not_an_image 1)"), last
    assert "no image was accepted" in last
    for args, text in [
        (("dataset", "build", "--source", "nope", "--out", out), "unknown source 'nope'"),
        (("dataset", "show", f"{out}@9"), "unknown version 9"),
    ]:
        r = run_cli(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], (args, r.stderr)
    for args, text in [
        (("dataset", "build", "--source", "synthetic:ten", "--out", out), "is not synthetic:N"),
        (("dataset", "build", "--source", f"dir:{tmp_path / 'none'}", "--out", out), "is not a folder"),
        (("dataset", "build", "--source", f"urls:{bad_list}", "--out", out), "is not an http(s) URL"),
        (("dataset", "build", "--source", "twemoji", "--out", "gs://b/x"), "scheme 'gs'"),
        (("dataset", "show", out, "--tag", "nope"), "unknown tag 'nope'"),
        (("dataset", "restore", out, "5"), "unknown version 5"),
        (("dataset", "versions", str(tmp_path / "missing")), "no dataset at"),
        (("dataset", "build", "--source", "twemoji", "--out", out, "--limit", "0"),
         "--limit must be a positive number of images, got 0"),
    ]:
        code, err = cli_in_process(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and text in lines[0], (args, err)
    assert DeltaTable(out).version() == before
