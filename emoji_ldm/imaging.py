"""Imaging: decoding, cleaning and transparency of emoji images (PIL, NumPy and OpenCV; no Ray, no torch).

Cleaning (ingest, crawl, DreamBooth): decode, clean, resize and hash one image.

`clean_image(data, config)` turns the raw bytes of any PNG, JPEG, WebP or
GIF/APNG into the stored form: an RGBA PNG of `size x size` (resized in
premultiplied alpha, padded with transparency to keep the aspect ratio), or with
`background` set, an RGB PNG with transparency composited onto that colour. An
opaque input stays opaque unless `key_background` turns its flat background into
alpha (`emoji_ldm.imaging.key_background`). Every kept image says what happened to
its alpha (`ALPHA_KINDS`), which the build counts. It never raises for bad bytes:
it returns a `Rejected` with a short machine-readable reason (`empty`,
`too_large_bytes`, `not_an_image`, `too_many_pixels`, `truncated`, `undecodable`,
`unsupported_format`, `fully_transparent`) that the ingest stage counts and keeps.

Transparency (ingest, inference and eval):

- `key_background`: a flat background into alpha with a soft edge (ingest `--key-background`, and the
  images of 3-channel models, which draw on a known flat colour);
- `finish_alpha`: a 4-channel VAE's alpha without its faint haze (generated images);
- `composite`: RGBA onto a flat colour (the judge and emoji-FID see every image on mid-grey);
- `alpha_figures`: the transparent-border share and the edge quality that `eval` reports.

Stored and generated RGBA is straight (not premultiplied) alpha with the colour of fully transparent pixels
zeroed, so one picture has one content hash; resizing goes through Pillow's premultiplied path (`RGBa`), so
edges get no dark or light fringe.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError

MID_GREY = (128, 128, 128)
# a 3-channel model's background (`VAESpec.key_colour`'s default): a colour emoji rarely use, the chroma-key convention
KEY_COLOUR = "#00ff00"

# Keying, in CIELAB distance (OpenCV's 8-bit Lab: L, a, b in 0..255). The background is the colour of the
# corners, when at least three of the four agree within FLAT (JPEG noise on a flat fill stays under about 6)
# and at least FLAT_SHARE of the border ring has it too (an emoji may cover much of its square's sides, a
# photo's border is not one colour). The background is the pixels within SOFT_LO of that colour in regions
# that touch the border; the EDGE pixels around it are partly transparent (their RGB distance from the
# background over that of the nearest foreground colour), unless nothing nearby stands SOFT_HI out (noise).
FLAT, FLAT_SHARE = 10.0, 0.1
CORNER = 2  # pixels: the corner patches
BORDER = 2  # pixels: the outer ring that must share the corners' colour
EDGE = 2  # pixels: how far from the background its edge (the partly transparent pixels) reaches
SOFT_LO, SOFT_HI = 8.0, 28.0

# A 4-channel VAE decodes alpha as a regression: background comes out at a few percent (a faint dark haze
# over the square, visible on a light theme), a solid subject at 90-odd percent. `finish_alpha` stretches
# alpha so that below ALPHA_LEVELS[0] is transparent and above ALPHA_LEVELS[1] opaque, linear between (a
# levels adjustment of the alpha band): antialiased edges stay soft, real emoji (alpha 0 or 255 but at their
# edges) are left as they are. bench/RESULTS.md "Finishing a VAE's alpha" measures it.
ALPHA_LEVELS = (0.1, 0.9)


def canonical(rgba: Image.Image) -> Image.Image:
    """RGBA with the colour of fully transparent pixels zeroed (invisible, but it would change the hash)."""
    rgba = rgba if rgba.mode == "RGBA" else rgba.convert("RGBA")
    out = Image.new("RGBA", rgba.size, (0, 0, 0, 0))
    out.paste(rgba, mask=rgba.getchannel("A").point(_VISIBLE))  # a mask of 0 or 255: pixels copied or left 0
    return out


_VISIBLE = [0] + [255] * 255  # alpha -> the paste mask of `canonical`


def finish_alpha(img: Image.Image, levels: tuple[float, float] = ALPHA_LEVELS) -> Image.Image:
    """`img` (RGBA, straight alpha) with alpha below `levels[0]` made 0, above `levels[1]` 255, linear between;
    colour untouched but where it became fully transparent (zeroed, as `canonical`)."""
    lo, hi = levels
    lut = [round(min(max((v / 255 - lo) / (hi - lo), 0.0), 1.0) * 255) for v in range(256)]
    r, g, b, a = img.convert("RGBA").split()
    return canonical(Image.merge("RGBA", (r, g, b, a.point(lut))))


def resize_rgba(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize in premultiplied alpha (Pillow's `RGBa`): a transparent neighbour adds no colour to an edge."""
    resized = (img if img.mode == "RGBA" else img.convert("RGBA")).convert("RGBa").resize(size,
                                                                                          Image.Resampling.LANCZOS)
    return canonical(resized.convert("RGBA"))


def model_pixels(img: Image.Image, size: int, channels: int, key_colour) -> np.ndarray:
    """An image as a VAE takes it: (channels, size, size) float32 in [-1, 1]. 4 channels keep alpha (straight
    RGBA; an RGB image is opaque); 3 composite any transparency onto `key_colour` (the colour a 3-channel
    model learns emoji on, and inference keys)."""
    img = img.convert("RGBA")
    if img.size != (size, size):
        img = resize_rgba(img, (size, size))
    if channels == 3:
        img = composite(img, key_colour)
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (C, H, W)


def composite(img: Image.Image, colour=MID_GREY) -> Image.Image:
    """`img` over a flat `colour` (a PIL colour name, #rrggbb or an RGB tuple), as RGB."""
    if img.mode == "RGB":
        return img
    rgb = ImageColor.getrgb(colour) if isinstance(colour, str) else tuple(colour)
    background = Image.new("RGBA", img.size, (*rgb[:3], 255))
    return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")


def _ring(a: np.ndarray, width: int) -> np.ndarray:
    """The outer `width` pixels of an (H, W, ...) array, flattened to (N, ...)."""
    h, w = a.shape[:2]
    mask = np.zeros((h, w), bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return a[mask]


def key_background(img: Image.Image, colour=None) -> Image.Image | None:
    """An opaque image on a flat background -> RGBA with that background transparent, or None.

    `colour`: the background if known (a 3-channel model's key colour); otherwise the colour of the corners,
    and None when they disagree or the border is not that colour (a photo: keying it could cut the subject). Only
    background connected to the border becomes transparent (the white of an eye inside an outline stays),
    edges get alpha from their colour distance, and their colour is un-mixed from the background.
    Returns None too when keying would leave nothing, or remove nothing.
    """
    import cv2

    rgb = np.asarray(img.convert("RGB"))
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)  # (H, W, 3)
    if colour is None:
        c = CORNER
        corners = [(lab[:c, :c], rgb[:c, :c]), (lab[:c, -c:], rgb[:c, -c:]), (lab[-c:, :c], rgb[-c:, :c]),
                   (lab[-c:, -c:], rgb[-c:, -c:])]
        corner_lab = np.array([np.median(p.reshape(-1, 3), axis=0) for p, _ in corners])  # (4, 3)
        bg_lab = np.median(corner_lab, axis=0)
        agree = np.linalg.norm(corner_lab - bg_lab, axis=1) <= FLAT
        if agree.sum() < 3:
            return None
        if (np.linalg.norm(_ring(lab, BORDER) - bg_lab, axis=1) <= FLAT).mean() < FLAT_SHARE:
            return None
        bg_rgb = np.median(np.concatenate([q.reshape(-1, 3) for (_, q), ok in zip(corners, agree) if ok]),
                           axis=0).astype(np.float32)
    else:
        bg_rgb = np.array((ImageColor.getrgb(colour) if isinstance(colour, str) else colour)[:3], np.float32)
        bg_lab = cv2.cvtColor(bg_rgb.astype(np.uint8).reshape(1, 1, 3), cv2.COLOR_RGB2LAB).reshape(3)
        bg_lab = bg_lab.astype(np.float32)
    dist = np.linalg.norm(lab - bg_lab, axis=2)  # (H, W)
    # the background: pixels of its colour in regions that touch the border
    core = (dist < SOFT_LO).astype(np.uint8)
    _, labels = cv2.connectedComponents(core, connectivity=4)
    touching = np.unique(_ring(labels, 1)[_ring(core, 1) > 0])
    region = np.isin(labels, touching) & (core > 0)  # (H, W) bool
    if not region.any():
        return None
    # the edge: pixels within EDGE of it, each a mix C = a F + (1 - a) B with F the nearest foreground colour,
    # so a = |C - B| / |F - B|, with |F - B| the largest distance nearby (mixing is linear in RGB)
    d_rgb = np.linalg.norm(rgb.astype(np.float32) - bg_rgb, axis=2)  # (H, W)
    kernel = np.ones((2 * EDGE + 1, 2 * EDGE + 1), np.uint8)
    band = (cv2.dilate(region.astype(np.uint8), kernel) > 0) & ~region
    fg_dist = cv2.dilate(d_rgb, kernel)
    alpha = np.ones(dist.shape, np.float32)
    alpha[band] = np.clip(d_rgb[band] / np.maximum(fg_dist[band], 1e-6), 0.0, 1.0)
    alpha[band & (fg_dist < SOFT_HI)] = 0.0  # nothing nearby stands out from the background: noise
    alpha[region] = 0.0
    if (alpha > 0.5).mean() < 0.02 or alpha.min() >= 1.0:
        return None
    # un-mix the edge colour: C = a F + (1 - a) B  =>  F = (C - (1 - a) B) / a
    a = alpha[..., None]
    fg = np.where(a > 0, (rgb.astype(np.float32) - (1.0 - a) * bg_rgb) / np.maximum(a, 1e-6), 0.0)
    out = np.dstack([np.clip(fg, 0, 255), alpha * 255.0]).round().astype(np.uint8)  # (H, W, 4)
    return canonical(Image.fromarray(out, "RGBA"))


def alpha_figures(images: list[Image.Image], band: int = 2) -> dict[str, float]:
    """What `eval` reports about transparency, for real or generated images.

    - `transparent_border`: the share of images whose outer pixel ring is mostly transparent (alpha < 16 on
      at least half of it; a round emoji touches its square's sides): an emoji, not a tile;
    - `stray_semi`: the share of pixels that are semi-transparent (16 <= alpha < 240) and farther than
      `band` pixels from the silhouette's edge (the boundary of alpha >= 128): haze and speckle, which
      clean edges do not have;
    - `opaque`: the share of images with no transparent pixel at all.
    """
    import cv2

    if not images:
        return {"transparent_border": 0.0, "stray_semi": 0.0, "opaque": 0.0}
    border = stray = pixels = opaque = 0
    kernel = np.ones((2 * band + 1, 2 * band + 1), np.uint8)
    for img in images:
        a = np.asarray(img.convert("RGBA"))[..., 3]
        border += float((_ring(a, 1) < 16).mean()) >= 0.5
        opaque += bool(a.min() == 255)
        solid = (a >= 128).astype(np.uint8)
        edge = cv2.dilate(solid, kernel) != cv2.erode(solid, kernel)  # a band around the silhouette
        semi = (a >= 16) & (a < 240)
        stray += int((semi & ~edge).sum())
        pixels += a.size
    n = len(images)
    return {"transparent_border": border / n, "stray_semi": stray / max(pixels, 1), "opaque": opaque / n}


def checkerboard(size: tuple[int, int], cell: int = 8) -> Image.Image:
    """The light grey checkerboard image editors draw under transparency, as RGB."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    board = np.where(((yy // cell) + (xx // cell)) % 2 == 0, 255, 204).astype(np.uint8)
    return Image.fromarray(np.dstack([board] * 3), "RGB")


def on_checkerboard(img: Image.Image, cell: int = 8) -> Image.Image:
    """`img` over a checkerboard, as RGB (sheets and galleries show transparency this way)."""
    if img.mode == "RGB":
        return img
    base = checkerboard(img.size, cell).convert("RGBA")
    return Image.alpha_composite(base, img.convert("RGBA")).convert("RGB")


# ---- cleaning: one image's bytes to the stored form ----

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
    return img if img.mode == "RGBA" else img.convert("RGBA")


def _decode(data: bytes, config: ImageConfig) -> tuple[Image.Image, str] | Rejected:
    """The first frame as RGBA, and the format; a `Rejected` for bytes that are not an image we take."""
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
            return _to_rgba(img), fmt
    except UnidentifiedImageError:
        return Rejected("not_an_image", "no image decoder recognises these bytes")
    except Image.DecompressionBombError as e:
        return Rejected("too_many_pixels", str(e)[:200])
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg or isinstance(e, EOFError) else "undecodable"
        return Rejected(reason, msg[:200])


def _fit(rgba: Image.Image, config: ImageConfig) -> tuple[Image.Image, str] | Rejected:
    """The image on its `size` x `size` canvas (aspect kept, centred), and what happened to its alpha: RGB
    flattened onto `background`, or RGBA resized in premultiplied alpha (a flat background keyed with
    `key_background`)."""
    w, h = rgba.size
    scale = config.size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    offset = ((config.size - new_w) // 2, (config.size - new_h) // 2)
    if config.background is not None:  # RGB: flatten, then resize
        colour = ImageColor.getrgb(config.background)
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, colour), rgba).convert("RGB")
        canvas = Image.new("RGB", (config.size, config.size), colour)
        canvas.paste(flat.resize((new_w, new_h), Image.Resampling.LANCZOS), offset)
        return canvas, "flattened"
    low, high = rgba.getextrema()[3]
    if high == 0:
        return Rejected("fully_transparent", f"{w}x{h} image with alpha 0 everywhere")
    alpha = "transparent" if low < 255 else "opaque"
    if alpha == "opaque" and config.key_background:
        keyed = key_background(rgba)
        alpha, rgba = ("keyed", keyed) if keyed is not None else ("busy_border", rgba)
    fitted = resize_rgba(rgba, (new_w, new_h)) if (new_w, new_h) != (w, h) else canonical(rgba)
    if fitted.size == (config.size, config.size):  # square: it is the canvas
        return fitted, alpha
    canvas = Image.new("RGBA", (config.size, config.size), (0, 0, 0, 0))
    canvas.paste(fitted, offset)
    return canvas, alpha


def clean_image(data: bytes, config: ImageConfig) -> Cleaned | Rejected:
    """Raw bytes -> the stored PNG with its content id, or a `Rejected` with its reason (never raises for bad
    bytes)."""
    decoded = _decode(data, config)
    if isinstance(decoded, Rejected):
        return decoded
    rgba, fmt = decoded
    fitted = _fit(rgba, config)
    if isinstance(fitted, Rejected):
        return fitted
    canvas, alpha = fitted
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=False, compress_level=1, compress_type=3)
    return Cleaned(id=content_hash(canvas), png=out.getvalue(), width=config.size, height=config.size,
                   orig_width=rgba.width, orig_height=rgba.height, orig_format=fmt, alpha=alpha)
