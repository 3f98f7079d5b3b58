"""Decode, clean, resize and hash one image (pure PIL, no Ray).

`clean_image(data, config)` turns the raw bytes of any PNG, JPEG, WebP or
GIF/APNG into the stored form: an RGBA PNG of `size x size` (resized in
premultiplied alpha, padded with transparency to keep the aspect ratio), or with
`background` set, an RGB PNG with transparency composited onto that colour. An
opaque input stays opaque unless `key_background` turns its flat background into
alpha (`emoji_ldm.alpha.key_background`). Every kept image says what happened to
its alpha (`ALPHA_KINDS`), which the build counts. It never raises for bad bytes:
it returns a `Rejected` with a short machine-readable reason (`empty`,
`too_large_bytes`, `not_an_image`, `too_many_pixels`, `truncated`, `undecodable`,
`unsupported_format`, `fully_transparent`) that the ingest stage counts and keeps.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageColor, UnidentifiedImageError

from emoji_ldm.alpha import canonical, key_background, resize_rgba
from emoji_ldm.errors import UserError
from emoji_ldm.options import opt

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "MPO", "BMP")  # what PIL decodes safely; others are rejected
# what happened to a kept image's alpha: it had transparency; it had none (opaque); --key-background made
# it (keyed); --key-background found no flat border and kept it opaque (busy_border); --background
# flattened it (flattened)
ALPHA_KINDS = ("transparent", "opaque", "keyed", "busy_border", "flattened")


@dataclass(frozen=True)
class ImageConfig:
    """How every image is normalised before it is stored."""

    size: int = opt(64, flag="image-size", help="stored images are N x N pixels")
    background: str | None = opt(None, help="flatten transparency onto this colour and store RGB (a PIL name "
                                             "or #rrggbb); by default images keep their alpha (RGBA)")
    key_background: bool = opt(False, help="opaque inputs on a flat colour (JPEG, WebP): turn the background "
                                           "into alpha with a soft edge; a busy border stays opaque")
    max_bytes: int = opt(20 * 1024 * 1024, cli=False, help="larger inputs are rejected before decoding")
    max_pixels: int = opt(4096 * 4096, help="reject images with more pixels than this (decompression bombs)")

    def __post_init__(self):
        if not isinstance(self.size, int) or not 8 <= self.size <= 1024:
            raise UserError(f"image size must be an integer from 8 to 1024, got {self.size!r}")
        if self.background is not None:
            try:
                ImageColor.getrgb(self.background)
            except ValueError:
                raise UserError(
                    f"background colour {self.background!r} is not a colour PIL knows; "
                    "use a name like 'white' or a hex value like '#ffffff'"
                ) from None
            if self.key_background:
                raise UserError(f"--key-background makes alpha and --background {self.background!r} flattens it: "
                                "give one of them")
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise UserError(
                f"max_bytes and max_pixels must be positive, got {self.max_bytes} and {self.max_pixels}"
            )


@dataclass(frozen=True)
class Cleaned:
    id: str  # content hash of the stored pixels, colour and alpha
    png: bytes  # RGBA PNG (RGB with `background`), size x size
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_format: str
    alpha: str  # one of ALPHA_KINDS

    @property
    def mode(self) -> str:
        return "RGB" if self.alpha == "flattened" else "RGBA"


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def content_hash(img: Image.Image) -> str:
    """Hash of the stored pixels (all channels, alpha too), so re-encodings of one picture dedupe to one row."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
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

    scale = config.size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    offset = ((config.size - new_w) // 2, (config.size - new_h) // 2)
    if config.background is not None:  # RGB: flatten, then resize (as tables before RGBA were built)
        colour = ImageColor.getrgb(config.background)
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, colour), rgba).convert("RGB")
        canvas = Image.new("RGB", (config.size, config.size), colour)
        canvas.paste(flat.resize((new_w, new_h), Image.Resampling.LANCZOS), offset)
        alpha = "flattened"
    else:
        low, high = rgba.getextrema()[3]
        if high == 0:
            return Rejected("fully_transparent", f"{w}x{h} image with alpha 0 everywhere")
        alpha = "transparent" if low < 255 else "opaque"
        if alpha == "opaque" and config.key_background:
            keyed = key_background(rgba)
            alpha, rgba = ("keyed", keyed) if keyed is not None else ("busy_border", rgba)
        canvas = Image.new("RGBA", (config.size, config.size), (0, 0, 0, 0))
        canvas.paste(resize_rgba(rgba, (new_w, new_h)) if (new_w, new_h) != (w, h) else canonical(rgba), offset)

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
        alpha=alpha,
    )
