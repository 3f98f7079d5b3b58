"""clean_image: every accepted format and every reject reason."""

import io

import pytest
from PIL import Image

from emoji_ldm.errors import UserError
from emoji_ldm.imaging import Cleaned, ImageConfig, Rejected, clean_image
from tests.conftest import make_bad_corpus, png_bytes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_bad_corpus(folder)


def test_corpus_outcomes(corpus):
    folder, expected = corpus
    config = ImageConfig(size=64)
    for name, reason in expected.items():
        result = clean_image((folder / name).read_bytes(), config)
        if reason is None:
            assert isinstance(result, Cleaned), (name, result)
            img = Image.open(io.BytesIO(result.png))
            assert img.size == (64, 64) and img.mode == "RGBA", name
            flat = Image.open(io.BytesIO(clean_image((folder / name).read_bytes(), ImageConfig(size=64,
                                                                                                background="white")).png))
            assert flat.mode == "RGB", name
        else:
            assert isinstance(result, Rejected) and result.reason == reason, (name, result)


def test_background_flattens_transparency_onto_it():
    data = png_bytes((255, 0, 0, 0), (10, 10))  # fully transparent red
    white = clean_image(data, ImageConfig(size=16, background="white"))
    black = clean_image(data, ImageConfig(size=16, background="black"))
    assert Image.open(io.BytesIO(white.png)).getpixel((8, 8)) == (255, 255, 255)
    assert Image.open(io.BytesIO(black.png)).getpixel((8, 8)) == (0, 0, 0)


def test_aspect_ratio_is_kept_by_padding():
    wide = png_bytes((0, 0, 255, 255), (40, 20))  # 2:1 blue
    img = Image.open(io.BytesIO(clean_image(wide, ImageConfig(size=32)).png))
    assert img.getpixel((16, 16)) == (0, 0, 255, 255)  # centre is the image
    assert img.getpixel((16, 1)) == (0, 0, 0, 0)  # top band is transparent padding
    assert img.getpixel((1, 16)) == (0, 0, 255, 255)  # full width


def test_palette_transparency_and_16bit_are_converted(corpus):
    folder, _ = corpus
    pal = Image.open(io.BytesIO(clean_image((folder / "palette_trns.png").read_bytes(), ImageConfig(size=32)).png))
    assert pal.getpixel((2, 16)) == (0, 0, 0, 0)  # the tRNS half stays transparent
    assert pal.getpixel((28, 16)) == (200, 0, 200, 255)
    g16 = Image.open(io.BytesIO(clean_image((folder / "gray16.png").read_bytes(), ImageConfig(size=48)).png))
    lo, hi = g16.convert("L").getextrema()
    assert hi - lo > 100, "16-bit grey must be scaled, not clipped to white"


def test_animated_gif_takes_first_frame(corpus):
    folder, _ = corpus
    img = Image.open(io.BytesIO(clean_image((folder / "animated.gif").read_bytes(), ImageConfig(size=24)).png))
    r, g, b, _ = img.getpixel((12, 12))
    assert r > 200 and g < 50 and b < 50


def test_content_hash_ignores_encoding():
    img = Image.new("RGB", (30, 30), (12, 34, 56))
    png, webp = io.BytesIO(), io.BytesIO()
    img.save(png, format="PNG")
    img.save(webp, format="WEBP", lossless=True)
    config = ImageConfig(size=30)
    assert clean_image(png.getvalue(), config).id == clean_image(webp.getvalue(), config).id
    assert clean_image(png_bytes((1, 1, 1, 255), (30, 30)), config).id != clean_image(png.getvalue(), config).id


def test_too_large_bytes():
    result = clean_image(png_bytes(size=(200, 200)), ImageConfig(max_bytes=100))
    assert isinstance(result, Rejected) and result.reason == "too_large_bytes"


@pytest.mark.parametrize("kwargs, text", [({"size": 4}, "image size"), ({"background": "nope"}, "'nope'"),
                                          ({"max_pixels": 0}, "positive")])
def test_config_errors_name_the_value(kwargs, text):
    with pytest.raises(UserError, match=text):
        ImageConfig(**kwargs)


def test_bmp_is_accepted_and_tiff_is_not():
    import io

    from PIL import Image

    from emoji_ldm.imaging import Cleaned, ImageConfig, Rejected, clean_image

    def encoded(fmt):
        buf = io.BytesIO()
        Image.new("RGB", (20, 10), (200, 30, 30)).save(buf, format=fmt)
        return buf.getvalue()

    bmp = clean_image(encoded("BMP"), ImageConfig(size=16))
    assert isinstance(bmp, Cleaned) and bmp.orig_format == "BMP" and (bmp.width, bmp.height) == (16, 16)
    tiff = clean_image(encoded("TIFF"), ImageConfig(size=16))
    assert isinstance(tiff, Rejected) and tiff.reason == "unsupported_format"

