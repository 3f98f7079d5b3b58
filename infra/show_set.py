"""The last lines of `make demo`: an emoji set's PNGs over a checkerboard, drawn in the terminal.

    python infra/show_set.py SET_DIR [--px 16]

Each emoji is shrunk to PX pixels and drawn with half blocks (two pixel rows a text row) in 24-bit colour,
over the light grey checkerboard that image editors draw under transparency, with its name under it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image


def _cells(img: Image.Image, px: int) -> list[list[tuple[int, int, int]]]:
    """(px, px) RGB rows of `img` shrunk to px pixels over a checkerboard of 2-pixel squares."""
    from emoji_ldm.imaging import on_checkerboard

    small = img.convert("RGBA").resize((px, px), Image.Resampling.BOX)
    rgb = on_checkerboard(small, cell=2)
    return [[rgb.getpixel((x, y)) for x in range(px)] for y in range(px)]


def render(images: list[Image.Image], names: list[str], px: int = 16) -> str:
    """The images side by side, one space apart, as ANSI half-block text with names underneath."""
    grids = [_cells(im, px) for im in images]
    lines = []
    for y in range(0, px, 2):
        parts = []
        for g in grids:
            top, bottom = g[y], g[y + 1] if y + 1 < px else g[y]
            parts.append("".join(f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m\u2580"
                                 for a, b in zip(top, bottom)) + "\x1b[0m")
        lines.append(" ".join(parts))
    lines.append(" ".join(n[:px].ljust(px) for n in names))
    return "\n".join(lines)


def set_images(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """The set's emoji in its manifest's order (else its PNGs by name, the sheet left out) and their names."""
    manifest = folder / "manifest.json"
    files = []
    if manifest.exists():
        items = json.loads(manifest.read_text()).get("items", [])
        files = [folder / it["file"] for it in items if isinstance(it, dict) and "file" in it]
    if not files:
        files = sorted(p for p in folder.glob("*.png") if p.name != "sheet.png")
    return [Image.open(f) for f in files], [f.stem for f in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an extracted emoji set (its PNGs and manifest.json)")
    parser.add_argument("--px", type=int, default=16, help="pixels an emoji is drawn at (default 16)")
    args = parser.parse_args(argv)
    images, names = set_images(args.folder)
    if not images:
        print(f"no emoji PNGs in {args.folder}", file=sys.stderr)
        return 1
    print(render(images, names, max(2, args.px)))
    sheet = args.folder / "sheet.png"
    if sheet.exists():
        print(f"(at full size: {sheet})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
