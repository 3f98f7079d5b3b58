"""The `metadata` captioner: no model, words from the title and tag plus colours measured in the pixels.

"red heart emoji (smileys & emotion), bright red, on a white background"
"red heart emoji (smileys & emotion), bright red, noto style, on a transparent background"
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image

# Rows of these sources (emoji_ldm/sources: the emoji sets a package ships) are captioned with their style, so
# one dataset of several sets teaches each style by name. Twemoji is left unnamed: it is the style a prompt
# without a style word draws, and its captions stay what every model so far was trained on.
STYLES = {"noto": "noto style", "openmoji": "openmoji style"}


def colour_name(rgb) -> str:
    """A plain English name for an RGB colour: hue family plus bright/dark/pale."""
    r, g, b = (c / 255.0 for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if s < 0.18 or v < 0.12 or (v < 0.28 and s < 0.5):
        if v < 0.28:
            return "black"
        if v > 0.9:
            return "white"
        return "light grey" if v > 0.65 else "dark grey" if v < 0.4 else "grey"
    hue = h * 360
    families = [(15, "red"), (40, "orange"), (68, "yellow"), (165, "green"), (200, "teal"), (255, "blue"),
                (290, "purple"), (345, "pink"), (361, "red")]
    name = next(n for limit, n in families if hue < limit)
    if name in ("orange", "red") and v < 0.6 and s > 0.35:
        return "brown" if name == "orange" else "dark red"
    if v < 0.45:
        return f"dark {name}"
    if s < 0.45 and v > 0.75:
        return f"pale {name}"
    if s > 0.6 and v > 0.8:
        return f"bright {name}"
    return name


def background(pixels: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The corners' colour when at least three of the four 4x4 corners are (nearly) that one colour.

    Corners, not the whole border: round emoji touch the middle of every edge.
    """
    corners = [pixels[:4, :4], pixels[:4, -4:], pixels[-4:, :4], pixels[-4:, -4:]]
    means = [c.reshape(-1, 3).astype(np.int32).mean(axis=0) for c in corners]
    flat = [np.abs(c.reshape(-1, 3).astype(np.int32) - m).sum(axis=1).max() < 40 for c, m in zip(corners, means)]
    for m in means:
        agree = sum(f and np.abs(m - other).sum() < 40 for f, other in zip(flat, means))
        if agree >= 3:
            return m, f"a {colour_name(m)} background"
    return None, "a busy background"


def dominant_colours(pixels: np.ndarray, bg: np.ndarray | None, top: int = 2) -> list[str]:
    """Names of the most common foreground colours (at least 10% of the foreground each)."""
    flat = pixels.reshape(-1, 3).astype(np.int32)
    if bg is not None:
        flat = flat[np.abs(flat - bg).sum(axis=1) >= 60]
    if len(flat) == 0:
        return []
    names: dict[str, int] = {}
    strip = Image.fromarray(flat.reshape(1, -1, 3).astype(np.uint8))
    quantized = strip.quantize(colors=6, method=Image.Quantize.MEDIANCUT)
    palette = quantized.getpalette()
    for count, index in sorted(quantized.getcolors(), reverse=True):
        name = colour_name(palette[3 * index: 3 * index + 3])
        names[name] = names.get(name, 0) + count
    ranked = sorted(names.items(), key=lambda kv: -kv[1])
    out: list[str] = []
    for name, count in ranked:  # one name per colour family: not "bright yellow and yellow"
        if count >= 0.1 * len(flat) and name.split()[-1] not in {o.split()[-1] for o in out}:
            out.append(name)
    return out[:top]


def describe(png: bytes, title: str | None, tag: str | None, source: str | None = None) -> str:
    with Image.open(io.BytesIO(png)) as im:
        rgba = np.asarray(im.convert("RGBA"))
    pixels, alpha = rgba[..., :3], rgba[..., 3]
    corners = [alpha[:4, :4], alpha[:4, -4:], alpha[-4:, :4], alpha[-4:, -4:]]
    if sum(bool((c < 16).all()) for c in corners) >= 3:  # an RGBA emoji: its colours are the opaque pixels'
        bg, bg_words = None, "a transparent background"
        pixels = pixels[alpha >= 128]  # (N, 3)
    else:
        bg, bg_words = background(pixels)
    colours = dominant_colours(pixels, bg)
    name = " ".join((title or "").replace("_", " ").split()).lower()
    head = f"{name} emoji" if name else "emoji"
    if tag:
        head += f" ({' '.join(tag.split()).lower()})"
    style = [STYLES[source]] if source in STYLES else []
    parts = [head] + ([" and ".join(colours)] if colours else []) + style + [f"on {bg_words}"]
    return ", ".join(parts)


def caption_batch(batch: dict) -> dict:
    """Ray Data batch function (no model, so plain tasks): image/title/tag (and `source`, where the batch has
    it) in; id, caption, error out (and `_file`, the data file the row came from, passed through)."""
    captions, errors = [], []
    sources = batch["source"] if "source" in batch else [None] * len(batch["id"])
    for png, title, tag, source in zip(batch["image"], batch["title"], batch["tag"], sources):
        try:
            captions.append(describe(png, title, tag, source))
            errors.append(None)
        except Exception as e:  # one bad image never fails its batch
            captions.append(None)
            errors.append(f"decode: {type(e).__name__}: {e}"[:200])
    return {"id": batch["id"], "caption": captions, "error": errors, **_passed_through(batch)}


def _passed_through(batch: dict) -> dict:
    return {"_file": batch["_file"]} if "_file" in batch else {}
