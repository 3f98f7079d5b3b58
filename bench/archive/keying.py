"""Keying benchmark: how well `--key-background` recovers the alpha of emoji saved on a flat background.

The set: every Twemoji PNG (or every `--step`th), composited onto a flat background (white, mid-grey, a
light blue, a saturated green) and saved as JPEG (quality 90, 4:2:0 chroma, as sites serve them). Each is
cleaned at 72 px the way `dataset build --key-background` cleans it, and its alpha (>= 128) compared with the
true alpha of the original: intersection over union, per image, with opaque (not keyed) images counted as
the whole square. Two ways in one run:

  1. ours: `emoji_ldm.imaging.key_background` (corner colour, border-connected background, soft edge);
  2. peer: ImageMagick's `-fuzz 10% -transparent <corner colour>` (every pixel near the corner colour turns
     transparent, wherever it is), computed with NumPy the way ImageMagick defines fuzz (RGB distance
     <= 10% of the largest).

Prints the mean IoU per background for each, the share keyed, and ours / peer.

    .venv/bin/python bench/keying.py [--step 1]
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from common import row, timed, write_record
from PIL import Image

from emoji_ldm.imaging import ImageConfig, clean_image, composite
from emoji_ldm.sources.twemoji import twemoji_dir

BACKGROUNDS = {"white": (255, 255, 255), "grey": (128, 128, 128), "light blue": (200, 225, 245), "green": (46, 139, 87)}
SIZE = 72


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def imagemagick_fuzz(jpeg: bytes, fuzz: float = 0.10) -> np.ndarray:
    """`convert in.jpg -fuzz 10% -transparent <corner colour>`: the mask of pixels kept opaque."""
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
    corner = rgb[0, 0]
    dist = np.sqrt(((rgb - corner) ** 2).sum(axis=2))
    return dist > fuzz * np.sqrt(3 * 255.0 ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step", type=int, default=1, help="every Nth Twemoji (1: all 4,009)")
    args = parser.parse_args()
    files = sorted(twemoji_dir().glob("*.png"))[::args.step]
    config = ImageConfig(size=SIZE, key_background=True)
    print(f"keying: {len(files)} Twemoji x {len(BACKGROUNDS)} backgrounds, JPEG q90, {SIZE} px", flush=True)
    rows = []
    for name, colour in BACKGROUNDS.items():
        ours, peer, kinds, t_ours = [], [], {}, 0.0
        for path in files:
            with Image.open(path) as im:
                src = im.convert("RGBA").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
            truth = np.asarray(src)[..., 3] >= 128
            buf = io.BytesIO()
            composite(src, colour).save(buf, format="JPEG", quality=90)
            seconds, result = timed(clean_image, jpeg := buf.getvalue(), config)
            t_ours += seconds
            kinds[result.alpha] = kinds.get(result.alpha, 0) + 1
            alpha = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGBA"))[..., 3] >= 128
            ours.append(iou(alpha, truth))
            peer.append(iou(imagemagick_fuzz(jpeg), truth))
        rows.append({"background": name, "ours_iou": np.mean(ours), "peer_iou": np.mean(peer), "keyed":
                     kinds.get("keyed", 0) / len(files), "ms_per_image": 1000 * t_ours / len(files)})
        print(f"  {name:10s}  ours IoU {np.mean(ours):.3f} (p10 {np.percentile(ours, 10):.3f}, keyed "
              f"{kinds.get('keyed', 0)}/{len(files)}, {1000 * t_ours / len(files):.1f} ms/image)   "
              f"ImageMagick fuzz 10% IoU {np.mean(peer):.3f} (p10 {np.percentile(peer, 10):.3f})   "
              f"ratio {np.mean(ours) / np.mean(peer):.2f}", flush=True)
    mean_ours, mean_peer = np.mean([r["ours_iou"] for r in rows]), np.mean([r["peer_iou"] for r in rows])
    print(f"keying: mean IoU ours {mean_ours:.3f}, ImageMagick {mean_peer:.3f}, ours/peer {mean_ours / mean_peer:.2f}")
    note = "per background " + ", ".join(f"{r['background']} {r['ours_iou'] / r['peer_iou']:.2f}x" for r in rows)
    write_record("keying", {"images": len(files), "backgrounds": rows}, [row(
        "transparency: keying", "alpha IoU, mean of the backgrounds: ours vs ImageMagick's fuzz", mean_ours, mean_peer,
        "", None, note)], about="Twemoji on flat backgrounds, JPEG q90; peer: ImageMagick `-fuzz 10% -transparent`.")


if __name__ == "__main__":
    main()
