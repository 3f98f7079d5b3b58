"""`synthetic:N[:SEED]`: N distinct, deterministic, emoji-like images drawn inside Ray Data tasks.

For load tests of a cluster and the scale benchmarks: no files, no network.
Item `i` of seed `s` is always the same picture: a face, heart, star, circle,
square, diamond or drop, in one of 16 named colours on one of 8 backgrounds,
with a mood (smiling, frowning, winking, surprised, sleepy) on faces. Its title
says so ("smiling yellow face on a white background"), so captioners and text
encoders have words to work with. A ring of 32 dots in the corners encodes `i`
(as "sparkles"), so all N images differ in their pixels and hash to N ids.

The listing is `ray.data.range(N)` (never a list on the driver); the pixels are
drawn where the bytes of any other source are read, in the ingest tasks, from
the locator `synthetic:SEED:I`.
"""

from __future__ import annotations

import hashlib
import io

from emoji_ldm.errors import UserError

SIZE = 72  # like the Twemoji PNGs
SHAPES = ("face", "heart", "star", "circle", "square", "diamond", "drop")
MOODS = ("smiling", "frowning", "winking", "surprised", "sleepy")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (250, 205, 50), "green": (60, 170, 70),
    "teal": (30, 160, 160), "blue": (50, 100, 220), "purple": (140, 70, 190), "pink": (240, 120, 180),
    "brown": (130, 80, 40), "black": (30, 30, 30), "grey": (140, 140, 140), "white": (250, 250, 250),
    "gold": (210, 170, 40), "navy": (25, 40, 110), "lime": (160, 220, 50), "maroon": (120, 20, 40),
}
BACKGROUNDS = {
    "white": (255, 255, 255), "light grey": (225, 225, 225), "pale blue": (210, 230, 250),
    "pale yellow": (252, 246, 210), "pale green": (215, 240, 215), "pale pink": (250, 220, 230),
    "black": (20, 20, 20), "dark blue": (20, 30, 70),
}
TAG = "synthetic"
BITS = 32  # dots that encode the item number: 2**32 distinct images per seed


def parse_spec(spec: str) -> tuple[int, int]:
    """'synthetic:N[:SEED]' -> (N, SEED)."""
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        n = int(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise UserError(f"source {spec!r} is not synthetic:N or synthetic:N:SEED (e.g. synthetic:10000:7)") from None
    if not 1 <= n <= 2**BITS:
        raise UserError(f"source {spec!r}: N must be 1..{2**BITS}, got {n}")
    if seed < 0:
        raise UserError(f"source {spec!r}: SEED must be 0 or more, got {seed}")
    return n, seed


def _choices(seed: int, i: int) -> dict:
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).digest()
    shape = SHAPES[h[0] % len(SHAPES)]
    colour = list(COLOURS)[h[1] % len(COLOURS)]
    bg = list(BACKGROUNDS)[h[2] % len(BACKGROUNDS)]
    if BACKGROUNDS[bg] == COLOURS.get(colour) or (colour == "white" and bg == "white"):
        bg = "dark blue"
    return {"shape": shape, "colour": colour, "background": bg, "mood": MOODS[h[3] % len(MOODS)],
            "scale": 0.62 + (h[4] % 24) / 100, "dx": h[5] % 7 - 3, "dy": h[6] % 7 - 3}


def describe(seed: int, i: int) -> str:
    """The title of item `i`: 'smiling yellow face on a white background'."""
    c = _choices(seed, i)
    thing = f"{c['mood']} {c['colour']} face" if c["shape"] == "face" else f"{c['colour']} {c['shape']}"
    return f"{thing} with sparkles on a {c['background']} background"


def locator(seed: int, i: int) -> str:
    return f"synthetic:{seed}:{i}"


def draw(loc: str) -> bytes:
    """PNG bytes of the item a `synthetic:SEED:I` locator names."""
    from PIL import Image, ImageDraw

    _, seed, i = loc.split(":")
    seed, i = int(seed), int(i)
    c = _choices(seed, i)
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[c["background"]])
    d = ImageDraw.Draw(img)
    fill = COLOURS[c["colour"]]
    ink = (20, 20, 20) if sum(fill) > 300 else (245, 245, 245)
    r = c["scale"] * SIZE / 2
    cx, cy = SIZE / 2 + c["dx"], SIZE / 2 + c["dy"]
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = c["shape"]
    if shape in ("face", "circle"):
        d.ellipse(box, fill=fill, outline=ink if shape == "face" else None, width=2)
    elif shape == "square":
        d.rounded_rectangle(box, radius=r / 4, fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "heart":
        q = r / 2
        d.ellipse((cx - r, cy - r * 0.8, cx, cy + q * 0.2), fill=fill)
        d.ellipse((cx, cy - r * 0.8, cx + r, cy + q * 0.2), fill=fill)
        d.polygon([(cx - r * 0.97, cy - q * 0.1), (cx + r * 0.97, cy - q * 0.1), (cx, cy + r)], fill=fill)
    elif shape == "star":
        import math

        points = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(points, fill=fill)
    else:  # drop
        d.ellipse((cx - r * 0.7, cy - r * 0.1, cx + r * 0.7, cy + r), fill=fill)
        d.polygon([(cx, cy - r), (cx - r * 0.66, cy + r * 0.3), (cx + r * 0.66, cy + r * 0.3)], fill=fill)
    if shape == "face":
        _face(d, cx, cy, r, c["mood"], ink)
    _sparkles(d, i, tuple(255 - v for v in BACKGROUNDS[c["background"]]))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _face(d, cx: float, cy: float, r: float, mood: str, ink) -> None:
    ey, ex, er = cy - r * 0.25, r * 0.35, max(2.0, r * 0.1)
    for side in (-1, 1):
        x = cx + side * ex
        if mood == "sleepy" or (mood == "winking" and side == 1):
            d.line((x - er, ey, x + er, ey), fill=ink, width=2)
        else:
            d.ellipse((x - er, ey - er, x + er, ey + er), fill=ink)
    my, mw = cy + r * 0.35, r * 0.45
    if mood in ("smiling", "winking"):
        d.arc((cx - mw, my - mw * 0.8, cx + mw, my + mw * 0.4), 20, 160, fill=ink, width=2)
    elif mood == "frowning":
        d.arc((cx - mw, my - mw * 0.2, cx + mw, my + mw), 200, 340, fill=ink, width=2)
    elif mood == "surprised":
        d.ellipse((cx - r * 0.15, my - r * 0.2, cx + r * 0.15, my + r * 0.15), outline=ink, width=2)
    else:
        d.line((cx - mw * 0.5, my, cx + mw * 0.5, my), fill=ink, width=2)


def _sparkles(d, i: int, colour) -> None:
    """Bit k of `i` lights dot k of 32 (8 per corner, in the background's inverse colour, inside the
    corners but off their outer 4x4 pixels that the metadata captioner reads as the background):
    every item has distinct pixels."""
    for k in range(BITS):
        if i >> k & 1:
            corner, j = divmod(k, 8)
            x = 5 + (j % 4) * 3 if corner in (0, 2) else SIZE - 16 + (j % 4) * 3
            y = 5 + (j // 4) * 3 if corner in (0, 1) else SIZE - 10 + (j // 4) * 3
            d.rectangle((x, y, x + 1, y + 1), fill=colour)


def item_batch(batch: dict, seed: int, spec: str) -> dict:
    """Ray Data task: `range` ids -> item rows (locator, title, ...)."""
    import numpy as np

    ids = batch["id"]
    n = len(ids)
    locators = [locator(seed, int(i)) for i in ids]
    return {
        "locator": np.array(locators, dtype=object),
        "source": np.array([spec] * n, dtype=object),
        "source_url": np.array(locators, dtype=object),
        "page_url": np.array([None] * n, dtype=object),
        "title": np.array([describe(seed, int(i)) for i in ids], dtype=object),
        "tag": np.array([TAG] * n, dtype=object),
        "caption": np.array([None] * n, dtype=object),
    }


class SyntheticSource:
    """`synthetic:N[:SEED]` as a Ray Dataset: `range(N)` mapped to item rows in tasks."""

    def __init__(self, spec: str):
        self.spec = spec
        self.n, self.seed = parse_spec(spec)

    def dataset(self, limit: int | None = None):
        import ray.data

        n = min(self.n, limit) if limit else self.n
        return ray.data.range(n).map_batches(item_batch, fn_kwargs={"seed": self.seed, "spec": self.spec},
                                             batch_format="numpy", batch_size=1024)
