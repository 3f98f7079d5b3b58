"""Real Ray Serve on a local Ray: animated emoji through /v1/generate and sets (each format opens in Pillow as
animated with N frames, keeps alpha, fits the target's cap), bad animation input, and a set's legibility,
consistency and bounded, recorded redraws with a judge on the server (and honestly unmeasured without one)."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.serving import deploy, post
from tests.tiny_models import tiny_model_with_card

RGBA_MODEL = {"dataset_mode": "RGBA", "vae_channels": 4, "alpha": "vae", "key_colour": None}
PIL_FORMATS = {"apng": ("image/apng", "PNG"), "gif": ("image/gif", "GIF"), "webp": ("image/webp", "WEBP")}
SET_ITEMS = ["grinning cat", "red heart", "blue heart", "xyzzy"]  # cat-face, heart, heart, no class


def tiny_judge(folder) -> str:
    """A judge of two Unicode subgroups with random weights (fixed seed): what it reads is arbitrary, which is
    all these tests need (the metrics themselves are tested in tests/unit/test_legibility.py)."""
    import torch

    from emoji_ldm.eval.judge import build_net

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    torch.save(build_net(2, 8).state_dict(), folder / "judge.pt")
    (folder / "judge.json").write_text(json.dumps({"classes": ["cat-face", "heart"], "label": "subgroup",
                                                   "image_size": 32, "width": 8}))
    return str(folder)


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """The app on a tiny RGBA model with a judge, and the same model under /plain without one."""
    from ray import serve

    root = tmp_path_factory.mktemp("serve-animation")
    model = str(tiny_model_with_card(root / "model", RGBA_MODEL))
    url = deploy(model, max_batch_size=4, judge=tiny_judge(root / "judge"))
    deploy(model, same_serve=True, name="plain", route_prefix="/plain", max_batch_size=4)
    yield {"url": url, "plain": url + "/plain"}
    serve.shutdown()


def frames_of(data: bytes, pil_format: str, n: int) -> list[Image.Image]:
    """The file's frames (RGBA), after checking it is an animation of `n` frames in `pil_format`."""
    from emoji_ldm.inference.animation import read_frames

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == pil_format and im.is_animated and im.n_frames == n, (im.format, im.n_frames)
    return read_frames(data)


@pytest.mark.parametrize("fmt", list(PIL_FORMATS))
def test_an_animated_emoji_of_each_format_fits_its_target_with_alpha(served, fmt):
    media, pil_format = PIL_FORMATS[fmt]
    body = {"prompt": "grinning cat", "steps": 2, "seed": 3, "animation": {"frames": 6, "format": fmt}}
    resp = post(served["url"] + "/v1/generate", {**body, "target": "slack", "format": "png"})
    assert resp.status == 200 and resp.headers["content-type"] == media, resp.data[:300]
    assert len(resp.data) <= 128 * 1024
    frames = frames_of(resp.data, pil_format, 6)
    assert all(f.size == (128, 128) for f in frames)
    # alpha kept: the loop as drawn (raw, lossless APNG) against this format at the drawn size
    drawn = post(served["url"] + "/v1/generate", {**body, "animation": {"frames": 6, "format": "apng"}}).json()
    drawn_alpha = [np.asarray(f)[..., 3] for f in frames_of(base64.b64decode(drawn["images"][0]), "PNG", 6)]
    raw = post(served["url"] + "/v1/generate", body).json()
    assert raw["metadata"][0]["animation"]["file"]["frames"] == 6
    assert set(raw["metadata"][0]["animation"]["metrics"]) == {"frame_change", "loop_closure", "flicker"}
    alpha = [np.asarray(f)[..., 3] for f in frames_of(base64.b64decode(raw["images"][0]), pil_format, 6)]
    assert 0 < np.mean([(a < 255).mean() for a in drawn_alpha]) < 1  # the model draws transparency
    for got, want in zip(alpha, drawn_alpha):
        if fmt == "gif":  # one-bit alpha, cut at one half
            assert np.array_equal(got, np.where(want < 128, 0, 255))
        else:
            assert np.array_equal(got, want)


@pytest.mark.parametrize(("animation", "field"), [
    ({"frames": 1}, "animation.frames"), ({"frames": 10**9}, "animation.frames"), ({"frames": -2}, "animation.frames"),
    ({"frames": 4, "format": "mov"}, "animation.format"), ({"frames": 4, "fps": 0}, "animation.fps"),
    ({"frames": 4, "matte": "plaid"}, "animation.matte"), ({"frames": 0, "format": "gif"}, "animation"),
    ({"frames": 4, "sparkle": True}, "animation.sparkle")])
def test_bad_animation_input_is_a_422_naming_it(served, animation, field):
    for route, extra in (("/v1/generate", {"prompt": "red heart"}), ("/v1/emoji-sets", {"theme": "t", "items": ["a"]})):
        resp = post(served["url"] + route, {**extra, "animation": animation})
        assert resp.status == 422 and resp.json()["field"] == field, (route, resp.data)
        assert "\n" not in resp.json()["error"]
    loop = post(served["url"] + "/v1/generate", {"prompt": "red heart", "scheduler": "ddpm",
                                                   "animation": {"frames": 4}})
    assert loop.status == 422 and "deterministic sampler" in loop.json()["error"]


def _zip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name.split("/", 1)[1]: zf.read(name) for name in zf.namelist()}


def test_an_animated_set_with_legibility_consistency_and_bounded_redraws(served):
    body = {"theme": "emoji", "items": SET_ITEMS, "template": "{item}", "steps": 2, "seed": 7, "target": "discord",
            "animation": {"frames": 4, "format": "gif", "matte": "dark"}, "min_legibility": 1.0, "max_redraws": 2}
    resp = post(served["url"] + "/v1/emoji-sets", body)
    assert resp.status == 200, resp.data[:500]
    files = _zip(resp.data)
    manifest = json.loads(files["manifest.json"])
    assert manifest["animation"]["frames"] == 4 and manifest["animation"]["format"] == "gif"
    for item in manifest["items"]:
        assert item["file"].endswith(".gif") and len(files[item["file"]]) <= 256 * 1024
        assert item["file_record"]["frames"] == 4 and item["file_record"]["size"] == 128
        assert set(item["metrics"]) == {"frame_change", "loop_closure", "flicker"}
        frames_of(files[item["file"]], "GIF", 4)
        with Image.open(io.BytesIO(files[item["file"]])) as im:  # the GIF's comment: the seed that drew it
            assert json.loads(im.info["comment"])["seed"] == item["seed"]
    quality = manifest["quality"]
    legibility = quality["legibility"]
    assert set(legibility["themes"]) == {"slack-light", "slack-dark", "discord-light", "discord-dark"}
    assert legibility["px"] == 22 and legibility["labelled"] == 3 and legibility["items"][3] is None
    assert legibility["min"] == min(legibility["themes"].values())
    assert isinstance(quality["consistency"]["score"], float) and quality["consistency"]["outlier"] in range(4)
    assert quality["judge"]["classes"] == 2 and quality["max_redraws"] == 2
    _check_redraws(manifest, floor=1.0, limit=2, seed=7)


def _check_redraws(manifest: dict, floor: float, limit: int, seed: int) -> None:
    """At most `limit` redraws per item, from seeds seed+1, seed+2, ..., each recorded with its score; an item
    still under the floor used every redraw; an item's seed is its base seed or that of a kept redraw."""
    redraws = manifest["quality"]["redraws"]
    for item in manifest["items"]:
        mine = [r for r in redraws if r["index"] == item["index"]]
        assert len(mine) <= limit and [r["seed"] for r in mine] == [seed + k for k in range(1, len(mine) + 1)]
        assert item["seed"] in [seed] + [r["seed"] for r in mine if r["kept"]]
        for r in mine:
            assert r["reason"] in ("legibility", "consistency") and (r["reason"] != "legibility" or
                                                                      0 <= r["legibility"] <= 1)
        if item["legibility"] is not None and item["legibility"] < floor:
            assert len(mine) == limit
        if item["legibility"] is None:  # no class to read it as: no legibility redraw
            assert all(r["reason"] == "consistency" for r in mine)


def test_a_set_without_a_judge_says_so_and_refuses_min_legibility(served):
    body = {"theme": "emoji", "items": SET_ITEMS[:2], "template": "{item}", "steps": 2, "format": "json"}
    resp = post(served["plain"] + "/v1/emoji-sets", body)
    assert resp.status == 200, resp.data[:300]
    quality = resp.json()["manifest"]["quality"]
    assert quality["legibility"].startswith("not measured: no judge") and quality["redraws"] == []
    assert quality["consistency"].startswith("not measured: no judge")
    refused = post(served["plain"] + "/v1/emoji-sets", {**body, "min_legibility": 0.5})
    assert refused.status == 409 and refused.json()["field"] == "min_legibility"
