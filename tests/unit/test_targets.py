"""Upload targets: sizes, file-size limits, names, and the set files made for them."""

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from emoji_ldm.errors import UserError
from emoji_ldm.inference.pngmeta import encode_png, generation_params, read_params
from emoji_ldm.inference.sampler import ImageAlpha, SampleJob, Sampler, to_rgba
from emoji_ldm.inference.targets import TARGETS, Target, emoji_name, fit, get_target
from emoji_ldm.serve.sets import set_files, set_manifest


def drawn(size=32) -> bytes:
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((4, 4, size - 5, size - 5), fill=(250, 200, 40, 255))
    params = generation_params(prompt="sun", seed=3, negative_prompt="", steps=4, guidance=5.0, scheduler="dpmpp",
                               width=size, height=size, model="/m", model_content_id="sha256:ab")
    return encode_png(img, params)


@pytest.mark.parametrize("name", ["slack", "discord", "github"])
def test_fit_sizes_keeps_alpha_and_lineage(name):
    target = get_target(name)
    out = fit(drawn(), target)
    img = Image.open(io.BytesIO(out))
    assert img.size == (128, 128) and img.mode == "RGBA" and len(out) <= target.max_bytes
    assert img.getpixel((0, 0))[3] == 0 and img.getpixel((64, 64)) == (250, 200, 40, 255)
    params = read_params(img.text)
    assert params["prompt"] == "sun" and params["seed"] == 3 and params["model_content_id"] == "sha256:ab"
    assert params["size"] == "32x32", "size stays the size drawn: it reproduces the image"
    assert params["target"] == f"{name} 128x128"


def test_raw_is_as_drawn_and_a_tight_limit_quantizes():
    assert fit(drawn(), TARGETS["raw"]) == drawn()
    pixels = np.random.default_rng(0).integers(0, 255, (128, 128, 4), dtype=np.uint8)
    pixels[:32, :, 3] = 0  # a transparent band: the palette PNG keeps it (tRNS)
    png = encode_png(Image.fromarray(pixels, "RGBA"))
    tight = Target("tight", 128, len(png) // 2)
    out = fit(png, tight)
    small = Image.open(io.BytesIO(out)).convert("RGBA")
    assert len(out) <= tight.max_bytes and small.size == (128, 128)
    assert np.asarray(small)[:32, :, 3].max() == 0 and np.asarray(small)[32:, :, 3].max() > 0
    with pytest.raises(UserError, match="over tiny's"):
        fit(png, Target("tiny", 128, 100))
    with pytest.raises(UserError, match="'teams'"):
        get_target("teams")


def test_emoji_names_follow_slack_and_discord_rules():
    taken: set[str] = set()
    assert emoji_name("Grinning cat!", taken) == "grinning_cat"
    assert emoji_name("grinning  CAT", taken) == "grinning_cat_2"
    assert emoji_name("Café au lait ☕", taken) == "cafe_au_lait"
    assert emoji_name("☕") == "emoji"
    assert emoji_name("x") == "emoji_x"
    long = emoji_name("a very long prompt that goes on and on about a cat")
    assert len(long) <= 32 and not long.endswith("_")


def test_set_for_slack_names_files_and_sizes_them():
    prompts = ["happy blob", "Happy blob!", "sad blob"]
    manifest = set_manifest("set-1", "blob", ["happy", "Happy!", "sad"], prompts, {"seed": 0}, {}, "/m", "slack")
    assert [i["name"] for i in manifest["items"]] == ["happy_blob", "happy_blob_2", "sad_blob"]
    assert [i["alias"] for i in manifest["items"]] == [":happy_blob:", ":happy_blob_2:", ":sad_blob:"]
    assert [i["file"] for i in manifest["items"]] == ["happy_blob.png", "happy_blob_2.png", "sad_blob.png"]
    assert manifest["target"] == {"name": "slack", "size": 128, "max_bytes": 131072}
    files = set_files(manifest, [drawn()] * 3)
    assert Image.open(io.BytesIO(files["sad_blob.png"])).size == (128, 128)
    assert json.loads(files["manifest.json"])["items"][2]["alias"] == ":sad_blob:"
    raw = set_manifest("set-2", "blob", ["happy"], ["happy blob"], {"seed": 0}, {}, "/m")
    assert raw["items"][0]["file"] == "000-happy.png" and raw["items"][0]["name"] == "happy_blob"


def test_generated_images_come_out_rgba():
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    assert to_rgba(rgba).getpixel((0, 0)) == (0, 0, 0, 0), "hidden colour zeroed"
    on_key = Image.new("RGB", (32, 32), (0, 255, 0))
    ImageDraw.Draw(on_key).ellipse((6, 6, 25, 25), fill=(200, 30, 30))
    keyed = to_rgba(on_key, ImageAlpha("key", "#00ff00"))
    assert keyed.mode == "RGBA" and keyed.getpixel((0, 0))[3] == 0 and keyed.getpixel((16, 16))[3] == 255
    assert to_rgba(on_key).getpixel((0, 0)) == (0, 255, 0, 255), "no key colour: opaque, as drawn"


@pytest.mark.parametrize("alpha", ["vae", "none"])
def test_a_model_trained_on_opaque_images_draws_opaque_ones(tmp_path, alpha):
    """A 4-channel VAE draws an alpha channel whatever it learned; a model whose card says it learned opaque
    (RGB) images gives opaque images, one that learned RGBA gives the alpha it draws."""
    from tests.tiny_models import tiny_model_with_card

    folder = tiny_model_with_card(tmp_path / "m", {"dataset_mode": "RGBA" if alpha == "vae" else "RGB",
                                                    "vae_channels": 4, "alpha": alpha, "key_colour": None})
    sampler = Sampler.load(str(folder))
    images = sampler.sample([SampleJob(("a cat",) * 2, (0, 1), "", 2, 5.0, scheduler=None)])[0]
    alphas = np.stack([np.asarray(im)[..., 3] for im in images])  # (2, H, W)
    assert all(im.mode == "RGBA" for im in images)
    if alpha == "none":
        assert alphas.min() == 255, "a model that learned opaque images draws opaque ones"
    else:
        assert alphas.min() < 255, "the tiny random 4-channel VAE draws some transparency"
