"""A set's files and quality without Serve: animated items fitted under the target's cap (or a 422 naming
`animation`), and `draw_set`'s legibility and consistency redraws, bounded and recorded, with a stand-in judge
and a stand-in Generator."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from emoji_ldm.inference.animation import AnimationSettings, encode_loop, read_frames
from emoji_ldm.inference.sampler import SampleJob
from emoji_ldm.inference.targets import TARGETS, Target
from emoji_ldm.serve import sets
from emoji_ldm.serve.errors import ApiError
from emoji_ldm.serve.schemas import EmojiSetRequest, GenerateRequest


def _shape(colour: str, square: bool = False, shift: int = 0) -> Image.Image:
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    (draw.rectangle if square else draw.ellipse)((6 + shift, 6, 26 + shift, 26), fill=colour)
    return im


def _drawn_loop(n: int = 6) -> bytes:
    """A loop as the Generator hands it over: a lossless APNG of its frames at the drawn size."""
    frames = [_shape("orange", shift=k % 3) for k in range(n)]
    return encode_loop(frames, AnimationSettings(frames=n, format="apng")).data


def test_a_loop_that_cannot_fit_the_cap_is_a_422_naming_animation(monkeypatch):
    body = GenerateRequest(prompt="spinning star", animation={"frames": 6, "format": "apng"}, target="slack")
    made = [(_drawn_loop(), {"seed": 1})]
    (fitted, params), = sets.finish_files(made, body)
    assert len(fitted) <= TARGETS["slack"].max_bytes and params["animation"]["file"]["frames"] == 6
    assert sets.media_type(params) == "image/apng"
    monkeypatch.setitem(TARGETS, "slack", Target("slack", 128, 300))  # no 6-frame loop fits 300 bytes
    with pytest.raises(ApiError) as caught:
        sets.finish_files(made, body)
    assert caught.value.status == 422 and caught.value.field == "animation"
    assert "does not fit 300 bytes" in caught.value.message and "\n" not in caught.value.message


def test_an_animated_set_is_webp_files_with_their_records():
    settings = AnimationSettings(frames=6, format="webp", matte="dark")
    manifest = sets.set_manifest("set-1", "blob", ["happy", "sad"], ["happy blob", "sad blob"], {"seed": 3}, {},
                                 "/m", "discord", settings)
    assert manifest["animation"]["format"] == "webp" and manifest["animation"]["path"].startswith("noise circle")
    files = sets.set_files(manifest, [_drawn_loop(), _drawn_loop()])
    assert [i["file"] for i in manifest["items"]] == ["happy_blob.webp", "sad_blob.webp"]
    for item in manifest["items"]:
        assert len(read_frames(files[item["file"]])) == 6 and item["file_record"]["format"] == "webp"
        assert set(item["metrics"]) == {"frame_change", "loop_closure", "flicker"}
    assert json.loads(files["manifest.json"])["items"][0]["file_record"]["size"] == 128


class _Judge:
    """Reads every image as a heart; its features are the pixels (so identical images are perfectly alike)."""

    classes, meta, size = ["cat-face", "heart"], {"label": "subgroup"}, 8

    def pixels(self, images):
        return np.stack([np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.uint8) for im in images])

    def features(self, pixels):
        return pixels.reshape(len(pixels), -1).astype(np.float32) + 1.0

    def predict(self, pixels):
        return ["heart"] * len(pixels)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _run_set(monkeypatch, **request):
    """draw_set with the stand-in judge; the Generator draws red discs, but a blue square for "blue heart" from
    its first seed. Returns (items, quality, calls)."""
    monkeypatch.setattr(sets, "service_judge", lambda uri: _Judge())
    body = EmojiSetRequest(theme="emoji", items=["grinning cat", "red heart", "blue heart", "yellow heart"],
                           template="{item}", seed=7, **request)
    calls = []

    async def sample(job: SampleJob):
        calls.append(job.seeds)
        return [(_png(_shape("blue", square=True) if p == "blue heart" and s == 7 else _shape("red")), {"seed": s})
                for p, s in zip(job.prompts, job.seeds)]

    job = SampleJob.of(tuple(body.prompts()), (body.seed,) * 4, body.sampler())
    made, quality = asyncio.run(sets.draw_set(sample, job, body, "/judges/one"))
    return made, quality, calls


def test_redraws_are_bounded_recorded_and_keep_only_what_helps(monkeypatch):
    made, quality, calls = _run_set(monkeypatch, min_legibility=0.5, max_redraws=2)
    # the cat is read as a heart on every theme: redrawn twice (seeds 8, 9), never better, so its first draw stays
    cat = [r for r in quality["redraws"] if r["index"] == 0]
    assert [(r["reason"], r["seed"], r["legibility"], r["kept"]) for r in cat] == [
        ("legibility", 8, 0.0, False), ("legibility", 9, 0.0, False)]
    # the blue square is the consistency outlier: its next seed draws a red disc like the rest, and that is kept
    square = [r for r in quality["redraws"] if r["index"] == 2]
    assert [(r["reason"], r["seed"], r["kept"]) for r in square] == [("consistency", 8, True)]
    assert square[0]["consistency"] > square[0]["was"] and quality["consistency"]["score"] == pytest.approx(1.0)
    assert quality["seeds"] == [7, 7, 8, 7] and json.loads(json.dumps(made[2][1]))["seed"] == 8
    assert len(calls) == 1 + 3  # the set, then one image per redraw
    legibility = quality["legibility"]
    assert legibility["items"] == [0.0, 1.0, 1.0, 1.0] and legibility["labelled"] == 4
    manifest = sets.set_manifest("set-2", "emoji", ["grinning cat", "red heart", "blue heart", "yellow heart"],
                                 ["grinning cat", "red heart", "blue heart", "yellow heart"], {"seed": 7}, {}, "/m",
                                 quality=quality)
    assert [i["seed"] for i in manifest["items"]] == [7, 7, 8, 7] and manifest["items"][0]["legibility"] == 0.0
    assert manifest["quality"]["max_redraws"] == 2 and "seeds" not in manifest["quality"]


def test_no_redraws_when_none_are_allowed(monkeypatch):
    _, quality, calls = _run_set(monkeypatch, min_legibility=1.0, max_redraws=0)
    assert quality["redraws"] == [] and len(calls) == 1 and quality["seeds"] == [7, 7, 7, 7]
    assert quality["consistency"]["outlier"] == 2  # measured and named, not redrawn
