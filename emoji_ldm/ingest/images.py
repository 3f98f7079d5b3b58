"""Decode, clean, resize and hash one image (pure PIL, no Ray).

`clean_image(data, config)` turns the raw bytes of any PNG, JPEG, WebP or
GIF/APNG into the stored form: an RGB PNG of `size x size`, transparency
composited onto `background`, aspect ratio kept by padding. It never raises
for bad bytes: it returns a `Rejected` with a short machine-readable reason
(`empty`, `too_large_bytes`, `not_an_image`, `too_many_pixels`, `truncated`,
`undecodable`, `unsupported_mode`) that the ingest stage counts and keeps.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageColor, UnidentifiedImageError

from emoji_ldm.errors import UserError
from emoji_ldm.options import opt

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "MPO", "BMP")  # what PIL decodes safely; others are rejected


@dataclass(frozen=True)
class ImageConfig:
    """How every image is normalised before it is stored."""

    size: int = opt(64, flag="image-size", help="stored images are N x N pixels")
    background: str = opt("white", help="colour that transparency is composited onto (a PIL name or #rrggbb)")
    max_bytes: int = opt(20 * 1024 * 1024, cli=False, help="larger inputs are rejected before decoding")
    max_pixels: int = opt(4096 * 4096, help="reject images with more pixels than this (decompression bombs)")

    def __post_init__(self):
        if not isinstance(self.size, int) or not 8 <= self.size <= 1024:
            raise UserError(f"image size must be an integer from 8 to 1024, got {self.size!r}")
        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            raise UserError(
                f"background colour {self.background!r} is not a colour PIL knows; "
                "use a name like 'white' or a hex value like '#ffffff'"
            ) from None
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise UserError(
                f"max_bytes and max_pixels must be positive, got {self.max_bytes} and {self.max_pixels}"
            )


@dataclass(frozen=True)
class Cleaned:
    id: str  # content hash of the stored pixels
    png: bytes  # RGB PNG, size x size
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_format: str


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def content_hash(rgb: Image.Image) -> str:
    """Hash of the stored pixels, so re-encodings of one picture dedupe to one row."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{rgb.mode}:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def _to_rgba(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGBA, keeping transparency (palette tRNS, LA, RGBA)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: PIL's convert("L") clips instead of scaling, so scale by hand.
        img = img.point(lambda v: v / 256).convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGBA")


def clean_image(data: bytes, config: ImageConfig) -> Cleaned | Rejected:
    if not data:
        return Rejected("empty", "0 bytes")
    if len(data) > config.max_bytes:
        return Rejected("too_large_bytes", f"{len(data)} bytes > max_bytes {config.max_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x raises) on decompression bombs; we check
            # the header size ourselves so the reason is explicit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in ACCEPTED_FORMATS:
                return Rejected("unsupported_format", f"format {fmt}")
            w, h = img.size
            if w * h > config.max_pixels:
                return Rejected("too_many_pixels", f"{w}x{h} > max_pixels {config.max_pixels}")
            if w == 0 or h == 0:
                return Rejected("empty", f"{w}x{h} image")
            img.seek(0)  # GIF / APNG / WebP animations: first frame
            img.load()
            rgba = _to_rgba(img)
    except UnidentifiedImageError:
        return Rejected("not_an_image", "no image decoder recognises these bytes")
    except Image.DecompressionBombError as e:
        return Rejected("too_many_pixels", str(e)[:200])
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg or isinstance(e, EOFError) else "undecodable"
        return Rejected(reason, msg[:200])

    background = Image.new("RGBA", rgba.size, ImageColor.getrgb(config.background))
    flat = Image.alpha_composite(background, rgba).convert("RGB")
    # Fit inside size x size keeping the aspect ratio, then pad to a square.
    scale = config.size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = flat.resize((new_w, new_h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (config.size, config.size), ImageColor.getrgb(config.background))
    canvas.paste(resized, ((config.size - new_w) // 2, (config.size - new_h) // 2))

    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=False, compress_level=6)
    return Cleaned(
        id=content_hash(canvas),
        png=out.getvalue(),
        width=config.size,
        height=config.size,
        orig_width=w,
        orig_height=h,
        orig_format=fmt,
    )
