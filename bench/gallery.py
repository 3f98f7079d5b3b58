"""The README gallery: a row per prompt (trained on, a held-out emoji, emoji that do not exist), models side by side.

Each row is one prompt; each model gets `--seeds` columns (the same seeds for every model, so a column is the
same starting noise). The first column is the real Twemoji image of that name when `--data` has one (blank for
the unseen prompts). Every image is drawn over the checkerboard editors use for transparency, so a model that
draws alpha shows it (an opaque model's images cover it). Writes one small PNG (for docs/).

    python bench/gallery.py --model small64=runs/small64 --model tiny=demo-out/run --data demo-out/twemoji \\
        --out docs/gallery-small64.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from emoji_ldm.imaging import on_checkerboard, resize_rgba  # noqa: E402

TRAINED = ("grinning face", "face with tears of joy", "smiling face with heart-eyes", "angry face", "red heart",
           "blue heart", "thumbs up", "cat face", "dog face", "pizza", "ghost")
HELD_OUT = ("sun",)  # Twemoji in the held-out (val) split of the demo dataset: real emoji the model never saw
UNSEEN = ("purple cat face", "green ghost", "orange thumbs up", "blue pizza")  # no such emoji exists


def real_images(data: str | None, titles: list[str], size: int) -> dict[str, Image.Image]:
    """The dataset's image for each title (an expression filter on the title column; only those rows read)."""
    if not data:
        return {}
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    rows = DeltaTable(data).to_pyarrow_dataset().to_table(columns=["title", "image"],
                                                        filter=pc.field("title").isin(titles))
    out = {}
    for title, image in zip(rows.column("title").to_pylist(), rows.column("image").to_pylist()):
        out.setdefault(title, resize_rgba(Image.open(io.BytesIO(image)), (size, size)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=URI")
    parser.add_argument("--data", default=None, help="the dataset (for the real image of each trained prompt)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's own (its model card)")
    parser.add_argument("--cell", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from emoji_ldm.inference.sampler import SampleJob, Sampler

    prompts = ([(p, "trained on") for p in TRAINED] + [(p, "held out") for p in HELD_OUT]
               + [(p, "never seen") for p in UNSEEN])
    seeds = tuple(range(args.seeds))
    columns: list[tuple[str, list[list[Image.Image]]]] = []
    for spec in args.model:
        name, _, uri = spec.partition("=")
        sampler = Sampler.load(uri)
        jobs = [SampleJob((p,) * len(seeds), seeds, "", args.steps, args.guidance) for p, _ in prompts]
        columns.append((name, sampler.sample(jobs)))
        print(f"{name}: {len(prompts) * len(seeds)} images", flush=True)
    real = real_images(args.data, list(TRAINED + HELD_OUT), args.cell)

    cell, label_w, head_h, gap = args.cell, 190, 18, 8
    width = label_w + cell + gap + len(columns) * (len(seeds) * cell + gap)
    sheet = Image.new("RGB", (width, head_h + len(prompts) * cell + gap), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    x0 = label_w
    draw.text((x0 + 4, 3), "Twemoji", fill="black", font=font)
    x = x0 + cell + gap
    for name, _ in columns:
        draw.text((x + 4, 3), name, fill="black", font=font)
        x += len(seeds) * cell + gap
    for r, (prompt, kind) in enumerate(prompts):
        y = head_h + r * cell + (gap if kind != "trained on" else 0)
        if r == len(TRAINED):
            draw.line((0, y - gap // 2, width, y - gap // 2), fill="grey")
        draw.text((4, y + cell // 2 - 12), prompt, fill="black", font=font)
        draw.text((4, y + cell // 2 + 2), kind, fill="grey", font=font)
        if prompt in real:
            sheet.paste(on_checkerboard(real[prompt]), (x0, y))
        x = x0 + cell + gap
        for _, images in columns:
            for image in images[r]:
                sheet.paste(on_checkerboard(resize_rgba(image, (cell, cell))), (x, y))
                x += cell
            x += gap
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"gallery: {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
