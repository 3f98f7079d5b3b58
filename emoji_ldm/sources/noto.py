"""`noto`: Noto Color Emoji, drawn from Debian's `fonts-noto-color-emoji` (a CBDT bitmap colour font).

The listing (on the driver) is the CLDR sequences (`cldr.sequences`) that the font draws as one glyph: every
code point in its cmap, and one glyph's advance once shaped (a ZWJ sequence or flag the font lacks shapes to
two or more glyphs). Titles and tags are the same CLDR names as every emoji set's. Each item's locator,
`noto:CODEPOINTS:FONT`, is drawn in the ingest tasks (`render`, through `fetch_bytes`), never on the driver:
the glyph's cell (136 x 128 at the font's one bitmap size) centred on a transparent 136 x 136 square, so a
small emoji stays small, as the font's designers drew it.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

from emoji_ldm import cldr
from emoji_ldm.errors import UserError
from emoji_ldm.sources.items import FetchError, SourceItem, items_dataset

FONT_DIR = Path("/usr/share/fonts/truetype/noto")  # where Debian's package puts it
FONT_FILE = "NotoColorEmoji.ttf"
PACKAGE = "fonts-noto-color-emoji"
INSTALL = f"`make noto-font` (or `sudo apt-get install -y {PACKAGE}`)"
SIZE = 109  # the font's one bitmap strike: FreeType scales CBDT glyphs only from it
PREFIX = "noto:"
# Where the same pictures are published upstream (recorded as source_url, never fetched).
UPSTREAM = "https://raw.githubusercontent.com/googlefonts/noto-emoji/main/png/128"
_JOINERS = {0x200D, 0xFE0F}  # shaped with their neighbours, not looked up in the cmap


def font_path(folder: Path | str = FONT_DIR) -> Path:
    """The font file in `folder`, or a UserError naming the package and how to install it."""
    path = Path(folder) / FONT_FILE
    if not path.is_file():
        raise UserError(f"--source noto needs Noto Color Emoji ({path} is missing): it comes from Debian's "
                        f"{PACKAGE}: install it with {INSTALL}")
    return path


@functools.lru_cache(maxsize=4)  # one open font per worker process and file, kept between batches
def _font(path: str):
    from PIL import ImageFont

    return ImageFont.truetype(path, SIZE, layout_engine=ImageFont.Layout.RAQM)


def drawable(path: Path) -> list[str]:
    """The CLDR sequences the font at `path` draws as one glyph, in code-point order."""
    from fontTools.ttLib import TTFont
    from PIL import features

    if not features.check("raqm"):  # without shaping every sequence would come out as separate glyphs
        raise UserError("--source noto needs Pillow with libraqm to shape emoji sequences: install Debian's "
                        "libfribidi0 (`sudo apt-get install -y libfribidi0`), which Pillow's bundled libraqm loads")
    cmap = TTFont(str(path), lazy=True).getBestCmap()
    font = _font(str(path))
    out = []
    for text in cldr.sequences():
        if any(ord(c) not in cmap for c in text if ord(c) not in _JOINERS):
            continue
        if font.getlength(text) < 1.5 * font.getlength(text[0]):  # one glyph, not a fallback of several
            out.append(text)
    return out


def locator(text: str, path: Path | str) -> str:
    return f"{PREFIX}{'-'.join(cldr.codepoints(text))}:{path}"


def noto_items(folder: Path | str = FONT_DIR) -> list[SourceItem]:
    path = font_path(folder)
    items = []
    for text in drawable(path):
        parts = cldr.codepoints(text)
        title, tag = cldr.describe(parts)
        # upstream's file names: `emoji_u1f44d_1f3fd.png`, without variation selectors
        upstream = "_".join(p for p in parts if p != cldr.VARIATION_SELECTOR)
        items.append(SourceItem(locator=locator(text, path), source="noto", title=title, tag=tag,
                                source_url=f"{UPSTREAM}/emoji_u{upstream}.png"))
    return items


def render(loc: str) -> bytes:
    """`noto:CODEPOINTS:FONT` -> an RGBA PNG: the glyph's cell centred on a transparent square."""
    from PIL import Image, ImageDraw

    try:
        _, seq, path = loc.split(":", 2)
        text = "".join(chr(int(c, 16)) for c in seq.split("-"))
    except ValueError:
        raise FetchError("bad_url", f"{loc[:200]!r} is not noto:CODEPOINTS:FONT") from None
    if not Path(path).is_file():  # checked here: Pillow would look for a font of that name elsewhere
        raise FetchError("fetch_failed", f"no font at {path}: install {PACKAGE} on every node")
    font = _font(path)
    left, top, right, bottom = font.getbbox(text)
    side = max(right - left, bottom - top)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    at = ((side - (right - left)) // 2 - left, (side - (bottom - top)) // 2 - top)
    ImageDraw.Draw(canvas).text(at, text, font=font, embedded_color=True)
    # Pillow leaves a colour glyph drawn on transparency premultiplied by its alpha (dark edges as straight
    # RGBA): read the pixels as premultiplied and convert, which divides the colour back out.
    straight = Image.frombytes("RGBa", canvas.size, canvas.tobytes()).convert("RGBA")  # (side, side, 4)
    out = io.BytesIO()
    straight.save(out, format="PNG", compress_level=1)
    return out.getvalue()


class NotoSource:
    """Noto Color Emoji from the Debian font in `folder` (the package's folder unless a test points elsewhere):
    about 3,700 items, listed on the driver (bounded by the font), drawn in the ingest tasks."""

    def __init__(self, folder: Path | str = FONT_DIR):
        self.path = font_path(folder)  # checked now, before Ray starts

    def dataset(self, limit: int | None = None):
        items = noto_items(self.path.parent)
        return items_dataset([item.to_row() for item in (items[:limit] if limit else items)])
