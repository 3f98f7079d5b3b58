"""A generated image: how it gets its alpha (`ImageAlpha`, from the model card; `to_rgba`), its PNG bytes with
their text chunks (`png_bytes`) and a contact sheet of many (`image_grid`). The Sampler applies `to_rgba` to every
image it draws; all four are also importable from `inference.sampler`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class ImageAlpha:
    """How a model's images get their alpha: its card's `image.alpha` (`encode.image_lineage`).

    - "vae": a 4-channel VAE draws it; the image is RGBA as drawn, its faint haze removed (`finish_alpha`);
    - "key": a 3-channel model learned RGBA images on `key_colour`, which is keyed into alpha;
    - "none": the model learned opaque (RGB) images, so its images are opaque, even where a 4-channel VAE
      draws an alpha below 255 (it never saw one: that is noise, not transparency);
    - None (no card, or a card from before RGBA): as "vae" for RGBA images, RGB opaque.
    """

    alpha: str | None = None
    key_colour: str | None = None

    @classmethod
    def of(cls, card: dict) -> "ImageAlpha":
        image = card.get("image") or {}
        alpha = image.get("alpha")
        return cls(alpha, image.get("key_colour") if alpha == "key" else None)


def to_rgba(image: Image.Image, alpha: ImageAlpha = ImageAlpha()) -> Image.Image:
    """A generated image as RGBA, as `alpha` says (see `ImageAlpha`); the hidden colour of fully transparent
    pixels zeroed (`alpha.canonical`). A keyed image stays opaque where keying finds nothing to remove."""
    from emoji_ldm.imaging import finish_alpha, key_background

    if alpha.alpha == "none":
        return image.convert("RGB").convert("RGBA")
    if image.mode == "RGBA":
        return finish_alpha(image)
    if alpha.key_colour:
        keyed = key_background(image, colour=alpha.key_colour)
        if keyed is not None:
            return keyed
    return image.convert("RGBA")


def png_bytes(image: Image.Image, params: dict | None = None) -> bytes:
    """PNG bytes; `params` (`pngmeta.generation_params`) become its text chunks."""
    from emoji_ldm.inference.pngmeta import encode_png

    return encode_png(image, params)


SHEET_CELL = 96


def sheet_thumbnail(image: Image.Image, cell: int = SHEET_CELL) -> Image.Image:
    """An image as `image_grid` draws it in a cell (nearest neighbour, so small emoji stay crisp): a caller with
    many large images keeps these, not the images, until the sheet is drawn."""
    return image.resize((cell - 4, cell - 4), Image.Resampling.NEAREST)


def image_grid(images: list[Image.Image], labels: list[str] | None = None, cell: int = SHEET_CELL,
               columns: int | None = None) -> Image.Image:
    """A sheet of images (upscaled with nearest neighbour so small emoji stay crisp, transparency on a
    checkerboard) with labels."""
    from emoji_ldm.imaging import on_checkerboard

    n = len(images)
    cols = columns or min(n, 8)
    rows = math.ceil(n / cols)
    label_h = 16 if labels else 0
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, img in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        sheet.paste(on_checkerboard(sheet_thumbnail(img, cell)), (x + 2, y + 2))
        if labels:
            draw.text((x + 3, y + cell - 1), labels[i][:18], fill="black", font=font)
    return sheet
