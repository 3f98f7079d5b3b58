"""Transparency: RGBA ingest (premultiplied resize, alpha in the hash, the alpha kinds), keying a flat
background into alpha, and the alpha figures eval reports."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from emoji_ldm.caption.metadata import describe
from emoji_ldm.errors import UserError
from emoji_ldm.imaging import (
    Cleaned,
    ImageConfig,
    Rejected,
    alpha_figures,
    clean_image,
    composite,
    finish_alpha,
    key_background,
    on_checkerboard,
    resize_rgba,
)
from emoji_ldm.sources.twemoji import twemoji_dir


def encoded(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def disc(size=64, colour=(230, 40, 40), eyes=None) -> Image.Image:
    """An RGBA red disc with a margin (an emoji), optionally with two white eyes inside."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.ellipse((6, 6, size - 7, size - 7), fill=(*colour, 255))
    if eyes:
        d.ellipse((20, 22, 28, 30), fill=(*eyes, 255))
        d.ellipse((36, 22, 44, 30), fill=(*eyes, 255))
    return img


def decoded(result) -> Image.Image:
    assert isinstance(result, Cleaned), result
    return Image.open(io.BytesIO(result.png))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_rgba_is_kept_and_resized_without_a_fringe():
    # a red disc on transparent pixels whose hidden colour is black: a straight resize would darken the edge
    img = disc(200)
    got = decoded(clean_image(encoded(img), ImageConfig(size=32)))
    assert got.mode == "RGBA"
    px = np.asarray(got).reshape(-1, 4)
    edge = px[(px[:, 3] >= 32) & (px[:, 3] < 255)]  # (below, 8-bit premultiplied colour is coarse)
    assert len(edge) > 10, "a downscaled disc has semi-transparent edge pixels"
    assert (edge[:, 0] >= 225).all() and (edge[:, 1] <= 45).all(), "edge pixels keep the disc's colour"
    assert (px[px[:, 3] == 0, :3] == 0).all(), "fully transparent pixels carry no colour"


def test_alpha_kinds_and_the_fully_transparent_reject():
    config = ImageConfig(size=16)
    assert clean_image(encoded(disc()), config).alpha == "transparent"
    assert clean_image(encoded(Image.new("RGB", (20, 20), (9, 9, 9))), config).alpha == "opaque"
    blank = clean_image(encoded(Image.new("RGBA", (20, 20), (255, 0, 0, 0))), config)
    assert isinstance(blank, Rejected) and blank.reason == "fully_transparent"
    assert clean_image(encoded(disc()), ImageConfig(size=16, background="white")).alpha == "flattened"


def test_la_16bit_rgba_and_apng_first_frame_keep_alpha():
    la = Image.new("LA", (20, 20), (0, 0))
    la.paste((200, 255), (5, 5, 15, 15))
    assert decoded(clean_image(encoded(la), ImageConfig(size=20))).getpixel((10, 10)) == (200, 200, 200, 255)
    assert decoded(clean_image(encoded(la), ImageConfig(size=20))).getpixel((1, 1))[3] == 0

    rgba16 = np.zeros((20, 20, 4), np.uint16)
    rgba16[5:15, 5:15] = (65535, 0, 0, 65535)
    import cv2  # Pillow writes no 16-bit RGBA PNG; OpenCV does (BGRA order)

    ok, png16 = cv2.imencode(".png", rgba16[..., [2, 1, 0, 3]])
    assert ok and Image.open(io.BytesIO(png16.tobytes())).info is not None
    got = decoded(clean_image(png16.tobytes(), ImageConfig(size=20)))
    assert got.getpixel((10, 10)) == (255, 0, 0, 255) and got.getpixel((1, 1))[3] == 0

    frames = [disc(32), Image.new("RGBA", (32, 32), (0, 255, 0, 255))]
    apng = encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    got = decoded(clean_image(apng, ImageConfig(size=32)))
    assert got.getpixel((1, 1))[3] == 0 and got.getpixel((16, 16))[:3] == (230, 40, 40)


def test_content_hash_sees_alpha():
    solid = Image.new("RGBA", (20, 20), (200, 0, 0, 255))
    faded = Image.new("RGBA", (20, 20), (200, 0, 0, 128))
    config = ImageConfig(size=20)
    assert clean_image(encoded(solid), config).id != clean_image(encoded(faded), config).id
    # the hidden colour of a fully transparent pixel is not part of the picture
    a, b = disc(), disc()
    b.paste((0, 255, 0, 0), (0, 0, 4, 4))
    assert clean_image(encoded(a), config).id == clean_image(encoded(b), config).id


@pytest.mark.parametrize("background", ["white", (128, 128, 128), "#2e8b57"])
def test_key_background_recovers_the_alpha_of_a_flat_jpeg(background):
    truth = disc(64, eyes=(255, 255, 255))
    jpeg = encoded(composite(truth, background), "JPEG", quality=90)
    result = clean_image(jpeg, ImageConfig(size=64, key_background=True))
    assert result.alpha == "keyed"
    alpha = np.asarray(decoded(result))[..., 3]
    # JPEG's half-resolution chroma bleeds a strong colour about a pixel into the background
    assert iou(alpha > 127, np.asarray(truth)[..., 3] > 127) > 0.9
    assert alpha[26, 24] == 255 and alpha[26, 40] == 255, "the white eyes inside the outline stay opaque"


def test_key_background_keeps_a_busy_photo_opaque():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize((96, 96),
                                                                                      Image.Resampling.BICUBIC)
    result = clean_image(encoded(photo, "JPEG"), ImageConfig(size=64, key_background=True))
    assert result.alpha == "busy_border"
    assert np.asarray(decoded(result))[..., 3].min() == 255, "never cut into a photo"
    assert key_background(photo) is None


def test_key_background_with_a_known_colour_and_nothing_to_key():
    truth = disc(48)
    keyed = key_background(composite(truth, "#ff00ff"), colour="#ff00ff")
    assert iou(np.asarray(keyed)[..., 3] > 127, np.asarray(truth)[..., 3] > 127) > 0.95
    assert key_background(Image.new("RGB", (32, 32), "#ff00ff"), colour="#ff00ff") is None  # nothing left


def test_key_background_and_background_conflict():
    with pytest.raises(UserError, match="'white'"):
        ImageConfig(background="white", key_background=True)


def test_alpha_figures_of_twemoji_and_of_tiles():
    twemoji = [resize_rgba(Image.open(p), (64, 64)) for p in sorted(twemoji_dir().glob("*.png"))[:200:10]]
    real = alpha_figures(twemoji)
    assert real["transparent_border"] >= 0.8 and real["opaque"] == 0.0 and real["stray_semi"] < 0.005
    tiles = alpha_figures([composite(t, "white").convert("RGBA") for t in twemoji])
    assert tiles == {"transparent_border": 0.0, "stray_semi": 0.0, "opaque": 1.0}
    hazy = [Image.fromarray(np.dstack([np.asarray(t)[..., :3], np.full((64, 64), 100, np.uint8)]), "RGBA")
            for t in twemoji]
    assert alpha_figures(hazy)["stray_semi"] > 0.5


def test_finish_alpha_removes_a_decoders_haze_and_leaves_real_emoji_alone():
    twemoji = [resize_rgba(Image.open(p), (64, 64)) for p in sorted(twemoji_dir().glob("*.png"))[:200:10]]
    # a decoder's output: the real alpha pulled towards the middle, a faint haze (8%) over the background
    drawn = [Image.fromarray(np.dstack([np.asarray(t)[..., :3], (20 + np.asarray(t)[..., 3] * 0.85).astype(
        np.uint8)]), "RGBA") for t in twemoji]
    before, after = alpha_figures(drawn), alpha_figures([finish_alpha(d) for d in drawn])
    assert before["transparent_border"] < 0.5 <= 0.8 <= after["transparent_border"]
    assert after["stray_semi"] < before["stray_semi"] / 2
    assert alpha_figures([finish_alpha(t) for t in twemoji]) == alpha_figures(twemoji)
    for t in twemoji:  # real emoji: alpha 0 and 255 stay, their soft edges stay soft but the faintest 10%
        a, b = np.asarray(t)[..., 3].astype(int), np.asarray(finish_alpha(t))[..., 3].astype(int)
        assert (b[a == 0] == 0).all() and (b[a == 255] == 255).all()
        assert (((b > 0) & (b < 255)) == ((a > 25) & (a < 230))).all()
    hidden = finish_alpha(Image.new("RGBA", (4, 4), (200, 10, 10, 20)))
    assert hidden.getpixel((0, 0)) == (0, 0, 0, 0), "colour of what became transparent is zeroed"
    assert finish_alpha(Image.new("RGBA", (4, 4), (200, 10, 10, 128))).getpixel((0, 0))[3] == 128


def test_checkerboard_shows_transparency():
    sheet = on_checkerboard(disc(32))
    assert sheet.mode == "RGB" and sheet.getpixel((0, 0)) == (255, 255, 255) and sheet.getpixel((8, 0)) == (204,) * 3


def test_metadata_caption_of_an_rgba_emoji():
    text = describe(encoded(disc(64)), "red circle", "symbols")
    assert text == "red circle emoji (symbols), bright red, on a transparent background"


def test_clip_score_sees_images_on_mid_grey(tmp_path):
    """As the judge and emoji-FID do; CLIP's processor alone would composite an RGBA image onto white."""
    from emoji_ldm.eval.scores import clip_score
    from tests.tiny_models import tiny_clip_model

    clip, emoji, prompt = str(tiny_clip_model(tmp_path / "clip")), disc(32), ["blue dog face"]
    score = clip_score(clip, [emoji], prompt)  # the tiny random CLIP scores this prompt above 0 (not clamped)
    assert score > 0 and score == pytest.approx(clip_score(clip, [composite(emoji)], prompt))
    assert score != pytest.approx(clip_score(clip, [composite(emoji, "white")], prompt))


def test_vae_reconstruction_reports_a_keyed_models_alpha(tmp_path):
    """A 3-channel VAE sees emoji on the key colour; a keyed model's alpha error is that of keying its
    reconstructions (as inference does) against the true alpha, and an opaque model has none."""
    from diffusers import AutoencoderKL

    from emoji_ldm.eval.scores import vae_reconstruction
    from emoji_ldm.imaging import KEY_COLOUR
    from emoji_ldm.inference.sampler import ImageAlpha
    from tests.tiny_models import tiny_sd_vae

    vae = AutoencoderKL.from_pretrained(tiny_sd_vae(tmp_path / "vae")).eval()
    images = [disc(32), disc(32, colour=(40, 40, 230))]
    keyed = vae_reconstruction(vae, images, 32, KEY_COLOUR, alpha=ImageAlpha("key", KEY_COLOUR))
    opaque = vae_reconstruction(vae, images, 32, KEY_COLOUR, alpha=ImageAlpha("none"))
    assert keyed["channels"] == 3 and keyed["alpha_keyed"] and 0 <= keyed["alpha_mse"] <= 4
    assert opaque["alpha_mse"] is None and not opaque["alpha_keyed"] and opaque["rgb_mse"] == keyed["rgb_mse"]
    # as seen: an opaque model's images are seen as drawn; a keyed one's after keying, on mid-grey
    assert opaque["visible_mse"] == opaque["rgb_mse"] and 0 <= keyed["visible_mse"] <= 4


def test_premultiplied_colour_loss_ignores_what_no_background_shows():
    """A 4-channel VAE's colour loss: with "premultiplied", a wrong colour under a transparent pixel costs
    nothing and under a half-transparent one half as much (what any background shows); "straight" charges
    every pixel's colour alike. What eval calls visible (on mid-grey) agrees."""
    import torch

    from emoji_ldm.models.builders import on_grey
    from emoji_ldm.train.vae import reconstruction_loss

    x = torch.full((1, 4, 4, 4), 0.5)  # (B, C, H, W) in [-1, 1]: colour 0.5
    x[:, 3, :2], x[:, 3, 2:] = -1.0, 0.0  # the top half transparent, the bottom half alpha 0.5
    hidden = x.clone()
    hidden[:, :3, :2] = -0.7  # another colour where alpha is 0
    half = x.clone()
    half[:, :3, 2:] = -0.7  # and where it is 0.5
    assert float(reconstruction_loss(hidden, x, "premultiplied")) == 0.0
    assert float(reconstruction_loss(hidden, x, "straight")) > 0.0
    assert 0.0 < float(reconstruction_loss(half, x, "premultiplied")) < float(reconstruction_loss(half, x, "straight"))
    assert float(((on_grey(hidden) - on_grey(x)) ** 2).mean()) == 0.0
    # a 3-channel VAE's loss is its pixels' whatever the option
    assert float(reconstruction_loss(hidden[:, :3], x[:, :3], "premultiplied")) > 0.0
