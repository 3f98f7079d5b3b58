"""The contact sheet of `emoji-ldm dataset show --sheet`: a grid of a version's first images with their
captions, transparent ones over a checkerboard."""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from emoji_ldm.errors import UserError
from emoji_ldm.imaging import on_checkerboard


def contact_sheet(rows: pa.Table, path: str, cell: int = 128, columns: int = 8) -> None:
    """A grid of images, each with its caption (or title) underneath."""
    if rows.num_rows == 0:
        raise UserError("the dataset has no rows to put on a contact sheet")
    font = ImageFont.load_default()
    label_h = 28
    n = rows.num_rows
    cols = min(columns, n)
    grid_rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, grid_rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows.to_pylist()):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        img = Image.open(io.BytesIO(row["image"]))
        pad = 8
        img = img.resize((cell - 2 * pad, cell - 2 * pad), Image.Resampling.NEAREST)
        sheet.paste(on_checkerboard(img, cell=8) if "A" in img.mode or "transparency" in img.info
                    else img.convert("RGB"), (x + pad, y + pad))
        label = (row.get("caption") or row.get("title") or "")[:44]
        for j, part in enumerate((label[:22], label[22:44])):
            draw.text((x + 4, y + cell - 2 + j * 12), part, fill="black", font=font)
    sheet.save(path)
