"""Captioning: metadata captions of known Twemoji, a tiny random Qwen2.5-VL through Ray Data actors,
failure isolation, resuming with --only-missing, and bad input."""

from __future__ import annotations

import datetime as dt
import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tests.tiny_models import tiny_qwen25_vl

TWEMOJI = {"2764": ("red heart", "Smileys & Emotion"), "1f499": ("blue heart", "Smileys & Emotion"),
           "1f600": ("grinning face", "Smileys & Emotion"), "1f34f": ("green apple", "Food & Drink"),
           "1f5a4": ("black heart", "Smileys & Emotion"), "1f47b": ("ghost", "Smileys & Emotion")}


def twemoji_png(code: str) -> bytes:
    from emoji_ldm.sources.twemoji import twemoji_dir

    with Image.open(twemoji_dir() / f"{code}.png") as im:
        rgba = im.convert("RGBA").resize((64, 64), Image.Resampling.LANCZOS)
    out = Image.new("RGB", rgba.size, "white")
    out.paste(rgba, mask=rgba.split()[3])
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def make_table(uri: str, rows: dict[str, tuple[bytes, str, str]]) -> None:
    """A dataset table written directly (so it can hold a corrupt image, which ingest would reject)."""
    from deltalake import write_deltalake

    from emoji_ldm.store.schema import EMOJI_SCHEMA

    now = dt.datetime.now(dt.timezone.utc)
    records = [{"id": hashlib.sha1(png).hexdigest(), "image": png, "width": 64, "height": 64, "orig_width": 72,
                "orig_height": 72, "orig_format": "PNG", "source": "test", "source_url": key, "title": title,
                "tag": tag, "caption": None, "caption_model": None, "caption_prompt_id": None, "ingested_at": now}
               for key, (png, title, tag) in rows.items()]
    write_deltalake(uri, pa.Table.from_pylist(records, schema=EMOJI_SCHEMA))


def captions(uri: str, version: int | None = None) -> dict[str, dict]:
    from deltalake import DeltaTable

    table = DeltaTable(uri, version=version).to_pyarrow_table()
    return {r["title"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return str(tiny_qwen25_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl"))


def test_metadata_captions_say_what_the_pixels_show(ray_local, tmp_path):
    from emoji_ldm.caption.stage import CaptionConfig, caption_dataset

    uri = str(tmp_path / "ds")
    make_table(uri, {code: (twemoji_png(code), title, tag) for code, (title, tag) in TWEMOJI.items()})
    summary = caption_dataset(CaptionConfig(dataset=uri))
    assert summary["captioned"] == 6 and summary["versions"] == [1]
    got = {title: row["caption"] for title, row in captions(uri).items()}
    assert got["red heart"] == "red heart emoji (smileys & emotion), bright red, on a white background"
    assert "blue" in got["blue heart"] and "red" not in got["blue heart"]
    assert "yellow" in got["grinning face"] and got["grinning face"].endswith("on a white background")
    assert "green" in got["green apple"] and "black" in got["black heart"] and "white" in got["ghost"]
    assert all(r["caption_model"] == "metadata" for r in captions(uri).values())
    assert all(r["caption"] is None for r in captions(uri, version=0).values())  # old version untouched


def test_one_caption_pass_is_one_version_and_a_killed_pass_resumes_from_its_staged_rows(
        ray_local, tmp_path, monkeypatch):
    from emoji_ldm.caption import stage
    from emoji_ldm.ingest.build import BuildConfig, build_dataset
    from emoji_ldm.store.delta import open_table

    uri = str(tmp_path / "ds")
    build_dataset(BuildConfig(source="synthetic:300:3", out=uri, batch_size=50))  # several data files
    build_dataset(BuildConfig(source="synthetic:360:3", out=uri, batch_size=50))  # 60 more rows, more files
    files_before = len(open_table(uri).file_uris())
    assert files_before >= 2

    def killed(self, write_result):
        raise RuntimeError("killed before the commit")

    monkeypatch.setattr(stage.CaptionRewriteSink, "on_write_complete", killed)
    with pytest.raises(RuntimeError, match="killed"):
        stage.caption_dataset(stage.CaptionConfig(dataset=uri))
    assert open_table(uri).version() == 1  # nothing half-written: still the last good version
    monkeypatch.undo()

    summary = stage.caption_dataset(stage.CaptionConfig(dataset=uri))
    assert summary["staged_now"] == 0  # every row was staged by the killed run: nothing captioned again
    assert summary["captioned"] == 360 and summary["versions"] == [2]  # one pass, one version
    table = open_table(uri)
    rows = table.to_pyarrow_table(columns=["caption", "title"]).to_pylist()
    assert len(rows) == 360 and all(r["caption"] and r["caption"].startswith(r["title"]) for r in rows)
    assert stage.caption_dataset(stage.CaptionConfig(dataset=uri, only_missing=True))["todo"] == 0


def test_qwen_captioner_batches_cleans_and_isolates_failures(qwen):
    """In-process: one generate call per batch, the chat prompt, a corrupt image and an empty generation."""
    from emoji_ldm.caption.prompt import DEFAULT_TEMPLATE
    from emoji_ldm.caption.qwen import QwenCaptioner, chat_text

    captioner = QwenCaptioner(qwen, DEFAULT_TEMPLATE, max_new_tokens=8, image_pixels=56 * 56)
    pngs = [twemoji_png(c) for c in ("2764", "1f499", "1f600")] + [b"not a png"]
    batch = {"id": np.array(["a", "b", "c", "d"]), "image": pngs,
             "title": np.array(["red heart", "blue heart", "grinning face", "broken"])}
    out = captioner(batch)
    assert captioner.calls == 1  # three good rows, one generate call
    assert out["error"][3].startswith("decode:") and out["caption"][3] is None
    assert all(out["error"][i] is None or out["error"][i] == "empty generation" for i in range(3))
    for text in out["caption"][:3]:
        assert text is None or ("\n" not in text and "<|" not in text and len(text) <= 300)

    text = chat_text("describe 'red heart'", 4)
    assert text.count("<|image_pad|>") == 4 and "describe 'red heart'" in text
    assert text.endswith("<|im_start|>assistant\n")

    captioner.generate = lambda pictures, titles: ["", "a blue heart"]  # what an empty generation looks like
    out = captioner({"id": np.array(["a", "b"]), "image": pngs[:2], "title": np.array(["red heart", "blue heart"])})
    assert out["error"] == ["empty generation", None] and out["caption"] == [None, "a blue heart"]


def test_qwen_through_ray_actors_and_only_missing_resumes(ray_local, qwen, tmp_path):
    from emoji_ldm.caption.prompt import DEFAULT_TEMPLATE, prompt_id
    from emoji_ldm.caption.stage import CaptionConfig, caption_dataset

    uri = str(tmp_path / "ds")
    rows = {code: (twemoji_png(code), title, tag) for code, (title, tag) in TWEMOJI.items()}
    rows["bad"] = (b"\x89PNG\r\n\x1a\n truncated", "broken", "x")
    make_table(uri, rows)
    base = dict(dataset=uri, captioner="qwen2.5-vl", model=qwen, batch_size=3, max_new_tokens=6)

    first = caption_dataset(CaptionConfig(**base, limit=4))  # a run that stopped early
    done_first = {t for t, r in captions(uri).items() if r["caption"]}
    assert first["todo"] == 4 and first["captioned"] + sum(first["failed"].values()) == 4

    second = caption_dataset(CaptionConfig(**base, only_missing=True))
    assert second["todo"] == 7 - len(done_first)  # only rows without a caption
    final = captions(uri)
    assert final["broken"]["caption"] is None
    assert second["failed"].get("decode", 0) + first["failed"].get("decode", 0) == 1
    assert "failures_uri" in second or "failures_uri" in first
    captioned = [r for r in final.values() if r["caption"]]
    assert len(captioned) >= 1
    assert all(r["caption_model"] == qwen and r["caption_prompt_id"] == prompt_id(DEFAULT_TEMPLATE)
               for r in captioned)
    for title in done_first:  # a resumed run never redoes finished rows
        assert final[title]["caption"] == captions(uri, version=1)[title]["caption"]
    assert second["versions"] == [2]  # one pass, one version


def test_caption_bad_input(qwen, tmp_path, cli_in_process):
    uri = str(tmp_path / "ds")
    make_table(uri, {"2764": (twemoji_png("2764"), "red heart", "x")})
    template = tmp_path / "t.txt"
    template.write_text("describe this emoji")
    cases = [
        ([uri, "--captioner", "blip"], "unknown captioner 'blip'"),
        ([uri, "--captioner", "qwen2.5-vl", "--model", str(tmp_path / "no-model")], "is not a folder"),
        ([uri, "--captioner", "qwen2.5-vl", "--model", qwen, "--template", str(template)], "{title}"),
        ([str(tmp_path / "nothing-here")], "nothing-here"),
        ([uri + "@0"], "without @version"),
    ]
    for args, message in cases:
        code, err = cli_in_process("dataset", "caption", *args)
        assert code == 2 and message in err, (args, err)
