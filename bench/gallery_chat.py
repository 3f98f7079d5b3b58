"""The README's animated row and light/dark strip: what a model's emoji look like where people use them.

- `--animated OUT.gif`: one row of animated loops drawn by the model (`Sampler.animate`: noise on a closed circle
  around each seed's noise, a deterministic sampler), each over the checkerboard editors use for transparency;
- `--chat OUT.png`: the same prompts as a chat shows them, at 22 px on Slack's and Discord's light and dark message
  backgrounds (`eval.legibility.THEMES`, the backgrounds the legibility score uses), at their real size and
  enlarged 3x with no smoothing so the reader sees the chat's own pixels.

    python bench/gallery_chat.py --model demo-out/run --animated docs/gallery-animated.gif \\
        --chat docs/gallery-chat.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from emoji_ldm.eval.legibility import CHAT_PX, THEMES, at_chat_size  # noqa: E402
from emoji_ldm.imaging import on_checkerboard, resize_rgba  # noqa: E402

# make demo's set (infra/demo_set.sh)
PROMPTS = ("red heart", "grinning face", "face with tears of joy", "soccer ball", "pizza", "rainbow")
ZOOM = 3  # the chat-size copies, enlarged this many times with nearest-neighbour


def animated_row(frames_per_prompt: list[list[Image.Image]], cell: int) -> list[Image.Image]:
    """One RGB image per frame: the prompts' loops side by side over the checkerboard."""
    n = len(frames_per_prompt[0])
    row = []
    for f in range(n):
        canvas = Image.new("RGB", (cell * len(frames_per_prompt), cell), "white")
        for i, frames in enumerate(frames_per_prompt):
            canvas.paste(on_checkerboard(resize_rgba(frames[f], (cell, cell))), (i * cell, 0))
        row.append(canvas)
    return row


def chat_strip(images: list[Image.Image]) -> Image.Image:
    """A row per chat theme: each emoji at chat size on that theme's background, then the same enlarged."""
    font = ImageFont.load_default()
    label_w, pad, big = 110, 6, CHAT_PX * ZOOM
    width = label_w + len(images) * (CHAT_PX + pad) + pad * 3 + len(images) * (big + pad)
    strip = Image.new("RGB", (width, len(THEMES) * (big + pad) + pad), "white")
    draw = ImageDraw.Draw(strip)
    for r, (theme, colour) in enumerate(THEMES.items()):
        y = pad + r * (big + pad)
        draw.rectangle((label_w - pad, y - pad // 2, width, y + big + pad // 2), fill=colour)
        draw.text((4, y + big // 2 - 6), theme, fill="black", font=font)
        x = label_w
        for image in images:
            small = at_chat_size(image, colour)  # RGB, CHAT_PX square, as the chat draws it
            strip.paste(small, (x, y + (big - CHAT_PX) // 2))
            x += CHAT_PX + pad
        x += pad * 3
        for image in images:
            strip.paste(at_chat_size(image, colour).resize((big, big), Image.Resampling.NEAREST), (x, y))
            x += big + pad
    return strip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained model (OUT/model of train, or its run folder)")
    parser.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's own (its model card)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--cell", type=int, default=64)
    parser.add_argument("--animated", help="write the animated row here (.gif)")
    parser.add_argument("--chat", help="write the light/dark chat strip here (.png)")
    args = parser.parse_args()
    if not (args.animated or args.chat):
        parser.error("nothing to draw: pass --animated OUT.gif and/or --chat OUT.png")

    from emoji_ldm.inference.animation import AnimationSettings
    from emoji_ldm.inference.sampler import SampleJob, Sampler

    prompts = tuple(p.strip() for p in args.prompts.split(",") if p.strip())
    sampler = Sampler.load(args.model)
    if args.chat:
        job = SampleJob(prompts, (args.seed,) * len(prompts), "", args.steps, args.guidance)
        strip = chat_strip(sampler.sample([job])[0])
        strip.save(args.chat, optimize=True)
        print(f"chat strip: {args.chat} ({strip.width}x{strip.height})")
    if args.animated:
        loop = AnimationSettings(frames=args.frames, fps=args.fps)
        frames = [sampler.animate(SampleJob((p,), (args.seed,), "", args.steps, args.guidance), loop)[0]
                  for p in prompts]
        row = animated_row(frames, args.cell)
        row[0].save(args.animated, save_all=True, append_images=row[1:], duration=1000 // args.fps, loop=0,
                    optimize=True)
        print(f"animated row: {args.animated} ({len(row)} frames, {Path(args.animated).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
