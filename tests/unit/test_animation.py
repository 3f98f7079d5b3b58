"""Animated emoji: the loop's noise, the three formats under the platforms' caps with alpha kept, the loop
metrics, and `generate --frames` on a tiny random pipeline (proves the code path, not quality)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from emoji_ldm.errors import UserError
from emoji_ldm.inference.animation import FORMATS, AnimationSettings, encode_loop, loop_metrics, loop_noise, read_frames
from emoji_ldm.inference.targets import TARGETS


def _noise(seed: int):
    return torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))


def _orbit(n: int = 12, size: int = 64) -> list[Image.Image]:
    """A yellow disc with a half-transparent spot, circling on a transparent square: a seamless loop."""
    frames = []
    for k in range(n):
        im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        d = ImageDraw.Draw(im)
        x = size / 2 + size / 6 * math.cos(2 * math.pi * k / n)
        y = size / 2 + size / 6 * math.sin(2 * math.pi * k / n)
        d.ellipse((x - size / 4, y - size / 4, x + size / 4, y + size / 4), fill=(255, 200, 0, 255))
        d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(200, 0, 0, 128))
        frames.append(im)
    return frames


def test_loop_noise_is_gaussian_closes_and_stays_near_the_still():
    n = 16
    z = loop_noise((1, 4, 8, 8), 7, n, 0.3)  # (16, 4, 8, 8)
    assert z.shape == (n, 4, 8, 8)
    # every frame an ordinary sample: unit variance over a large draw
    big = loop_noise((1, 4, 64, 64), 1, 8, 0.5)
    assert big.std(dim=(1, 2, 3)).sub(1).abs().max() < 0.03
    # closed: the step from the last frame to the first is like every other step
    steps = (z[1:] - z[:-1]).flatten(1).norm(dim=1)
    assert torch.allclose((z[0] - z[-1]).norm(), steps.mean(), rtol=0.2)
    # a small motion keeps every frame near the seed's own noise (the still image's)
    still = _noise(7)[0]
    assert all((f - still).norm() < (_noise(8)[0] - still).norm() / 2 for f in loop_noise((1, 4, 8, 8), 7, n, 0.2))
    # deterministic
    assert torch.equal(z, loop_noise((1, 4, 8, 8), 7, n, 0.3))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("target", ["slack", "discord"])
def test_each_format_is_animated_keeps_alpha_and_fits_the_cap(fmt, target):
    t = TARGETS[target]
    frames = _orbit(12)
    encoded = encode_loop(frames, AnimationSettings(frames=12, format=fmt), t.max_bytes, t.size)
    assert len(encoded.data) <= t.max_bytes
    with Image.open(io.BytesIO(encoded.data)) as im:
        assert im.format == {"apng": "PNG", "gif": "GIF", "webp": "WEBP"}[fmt]
        assert im.is_animated and im.n_frames == 12
        assert im.size == (t.size, t.size)
    first = np.asarray(read_frames(encoded.data)[0])
    alpha = first[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255  # transparent background, opaque subject
    if fmt != "gif":
        assert ((alpha > 0) & (alpha < 255)).any()  # 8-bit alpha: the soft spot survives


def test_gif_blends_soft_edges_onto_the_matte():
    frames = _orbit(4)
    light = read_frames(encode_loop(frames, AnimationSettings(frames=4, format="gif", matte="light")).data)[0]
    dark = read_frames(encode_loop(frames, AnimationSettings(frames=4, format="gif", matte="dark")).data)[0]
    # the half-transparent red spot: opaque in a GIF (alpha >= 128), blended onto white or Discord's grey
    spot = (32 + 64 // 6, 32)
    assert light.getpixel(spot)[3] == 255 and dark.getpixel(spot)[3] == 255
    assert sum(light.getpixel(spot)[:3]) > sum(dark.getpixel(spot)[:3])


def test_fitting_gives_up_frames_then_palette_then_size_and_says_so():
    frames = _orbit(24, size=64)
    settings = AnimationSettings(frames=24, format="apng")
    full = encode_loop(frames, settings, None, 128)
    fewer = encode_loop(frames, settings, len(full.data) * 2 // 3, 128)
    assert fewer.frames < 24 and fewer.colours is None and fewer.size == 128
    tiny = encode_loop(frames, settings, 6000, 128)
    assert tiny.colours is not None and len(tiny.data) <= 6000
    # the loop keeps its length: fewer frames show longer
    assert tiny.frames * tiny.duration_ms == pytest.approx(24 * full.duration_ms, rel=0.1)
    with pytest.raises(UserError, match="does not fit 500 bytes"):
        encode_loop(frames, settings, 500, 128)


def test_metrics_tell_a_seamless_loop_from_a_jump_and_from_flicker():
    loop = loop_metrics(_orbit(12))
    assert loop["frame_change"] > 0 and 0.7 < loop["loop_closure"] < 1.3 and loop["flicker"] < 0.01
    half = loop_metrics(_orbit(24)[:12])  # half an orbit: the restart jumps across the circle
    assert half["loop_closure"] > 3
    blink = [f if k % 2 else Image.new("RGBA", f.size, (0, 0, 0, 0)) for k, f in enumerate(_orbit(12))]
    assert loop_metrics(blink)["flicker"] > 10 * loop["flicker"]
    assert loop_metrics(_orbit(1)) == {"frame_change": 0.0, "loop_closure": 0.0, "flicker": 0.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"frames": 1}, "frames must be 0"), ({"frames": 49}, "frames must be 0"), ({"frames": 10**9}, "got 1000000000"),
    ({"frames": -1}, "frames must be 0"), ({"frames": 8, "format": "mp4"}, "format must be one of apng, gif, webp"),
    ({"frames": 8, "motion": 0}, "motion must be above 0"), ({"frames": 8, "fps": 0}, "fps must be"),
    ({"frames": 8, "matte": "{theme}"}, "matte must be light, dark"),
])
def test_bad_animation_settings_are_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        AnimationSettings(**kwargs)


def test_a_stochastic_sampler_is_refused_for_a_loop():
    with pytest.raises(UserError, match="deterministic sampler"):
        AnimationSettings(frames=8).check_scheduler("ddpm")
    AnimationSettings(frames=0).check_scheduler("ddpm")  # stills may use any sampler


def test_generate_frames_writes_loops_with_their_lineage(tmp_path, cli_in_process):
    from tests.tiny_models import tiny_model_with_card

    model = tiny_model_with_card(tmp_path / "model")
    out = tmp_path / "out"
    code, err = cli_in_process("generate", "--model", str(model), "--prompt", "spinning star", "--n", "2",
                               "--steps", "2", "--frames", "6", "--format", "gif", "--target", "slack",
                               "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "generate.json").read_text())
    assert [p.rsplit("/", 1)[1] for p in record["files"]] == ["000.gif", "001.gif"]
    for path, image in zip(record["files"], record["images"]):
        with Image.open(path) as im:
            assert im.is_animated and im.n_frames == image["file"]["frames"] and im.size == (128, 128)
            assert json.loads(im.info["comment"])["loop"].startswith("6 frames")
        assert image["loop"]["frames"] == 6 and set(image["metrics"]) == {"frame_change", "loop_closure", "flicker"}
        assert image["file"]["bytes"] <= TARGETS["slack"].max_bytes
    assert (out / "sheet.png").exists()


def test_generate_refuses_bad_frames_before_loading_a_model(cli_in_process):
    code, err = cli_in_process("generate", "--model", "/nonexistent", "--prompt", "x", "--frames", "0",
                               "--format", "gif", "--scheduler", "ddpm", "--out", "/tmp/unused")
    assert code == 0 or "no model" in err  # frames 0: a still, the model is looked up
    code, err = cli_in_process("generate", "--model", "/nonexistent", "--prompt", "x", "--frames", "500",
                               "--out", "/tmp/unused")
    assert code == 2 and "frames must be 0" in err and "/nonexistent" not in err
