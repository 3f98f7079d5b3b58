"""Upload targets: an emoji PNG sized, named and checked for the platform it goes to.

    slack     128 x 128, at most 128 KB   (Slack: "square, under 128 KB"; 128 px is what it shows)
    discord   128 x 128, at most 256 KB   (Discord: "128 x 128 recommended, under 256 KB")
    github    128 x 128, at most 1 MB     (no custom-emoji upload on github.com: for READMEs, issues and
                                           GitHub Enterprise; the size Slack and Discord use)
    raw       the model's own size, no limit

The models draw at 32 or 64 pixels, so a target upscales. No kept upscaler fits on this project's CPU path
(OpenCV's super-resolution needs opencv-contrib and downloaded weights; Real-ESRGAN needs its weights), so it is
a plain Lanczos resize in premultiplied alpha (`alpha.resize_rgba`: no fringe), which keeps an emoji's flat
shapes and outlines but adds no detail. A PNG over the limit is re-encoded with an adaptive palette that keeps
alpha (Pillow's quantize), halving the colours until it fits; at 128 x 128 RGBA (64 KB raw) that never happens.
Names follow both platforms' rules: lowercase letters, digits and underscores, 2 to 32 characters, unique in
their set, and `:name:` is the alias people type.
"""

from __future__ import annotations

import io
import re
import unicodedata
from dataclasses import dataclass

from PIL import Image

from emoji_ldm.errors import UserError


@dataclass(frozen=True)
class Target:
    name: str
    size: int | None  # pixels, square; None: as drawn
    max_bytes: int | None


TARGETS = {
    "slack": Target("slack", 128, 128 * 1024),
    "discord": Target("discord", 128, 256 * 1024),
    "github": Target("github", 128, 1024 * 1024),
    "raw": Target("raw", None, None),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown --target {name!r}: use one of {', '.join(TARGETS)}")
    return TARGETS[name]


def fit(png: bytes, target: Target) -> bytes:
    """`png` (RGBA, with its generation text chunks) at the target's size and under its file-size limit; its
    text chunks are kept (`size` stays the size drawn, which reproduces it) and `target` is added."""
    from emoji_ldm.imaging import resize_rgba
    from emoji_ldm.inference.pngmeta import encode_png, read_params

    if target.size is None:
        return png
    with Image.open(io.BytesIO(png)) as im:
        params = read_params(dict(im.text)) if getattr(im, "text", None) else None
        image = im.convert("RGBA")
    if image.size != (target.size, target.size):
        image = resize_rgba(image, (target.size, target.size))
    if params:
        params = {**params, "target": f"{target.name} {target.size}x{target.size}"}
    data = encode_png(image, params)
    colours = 256
    while target.max_bytes and len(data) > target.max_bytes and colours >= 16:
        data = encode_png(image.quantize(colours, method=Image.Quantize.FASTOCTREE), params)
        colours //= 2
    if target.max_bytes and len(data) > target.max_bytes:
        raise UserError(f"an emoji PNG is {len(data)} bytes even with 16 colours, over {target.name}'s "
                        f"{target.max_bytes} bytes")
    return data


def emoji_name(text: str, taken: set[str] | None = None) -> str:
    """A platform-safe emoji name for `text` ("Grinning cat!" -> "grinning_cat"), unique among `taken`
    (which it updates): lowercase ASCII letters, digits and underscores, 2 to 32 characters."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:32].strip("_")
    if len(name) < 2:
        name = f"emoji_{name}".strip("_")
    if taken is not None:
        base, k = name, 2
        while name in taken:
            suffix = f"_{k}"
            name, k = base[:32 - len(suffix)] + suffix, k + 1
        taken.add(name)
    return name
