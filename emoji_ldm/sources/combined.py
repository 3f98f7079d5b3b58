"""Emoji sets that packages ship, alone or several in one build: `twemoji`, `noto`, `openmoji`,
`twemoji+noto+openmoji`.

A combined build is one dataset version that holds every style. The same emoji drawn by two sets has the
same title and tag (CLDR) but different pixels, so it is two rows with two content ids, and each row's
`source` says its style.
"""

from __future__ import annotations

from emoji_ldm.errors import UserError

PACKS = ("twemoji", "noto", "openmoji")


def open_pack(name: str):
    """The source of one pack, checked now (a missing font or package fails here, naming the install)."""
    from emoji_ldm.sources import noto, openmoji, twemoji

    if name == "twemoji":
        return twemoji.TwemojiSource()
    if name == "noto":
        return noto.NotoSource()
    if name == "openmoji":
        return openmoji.OpenmojiSource()
    raise UserError(f"unknown emoji set {name!r}: use one of {', '.join(PACKS)}")


def is_combined(spec: str) -> bool:
    """`A+B`: packs joined by '+' (a `dir:`, `urls:` or `synthetic:` spec is never split: paths may hold '+')."""
    return "+" in spec and ":" not in spec


def parse(spec: str) -> list[str]:
    names = spec.split("+")
    unknown = [n for n in names if n not in PACKS]
    if unknown or len(set(names)) != len(names):
        what = f"{unknown[0]!r} is not an emoji set" if unknown else "each set may appear once"
        raise UserError(f"source {spec!r}: {what}; join {', '.join(PACKS)} with '+', e.g. twemoji+noto+openmoji")
    return names


def shares(limit: int | None, parts: int) -> list[int | None]:
    """`--limit N` over `parts` sets: N in all, as even as can be (the first sets take the remainder)."""
    if limit is None:
        return [None] * parts
    return [limit // parts + (1 if i < limit % parts else 0) for i in range(parts)]


class CombinedSource:
    """Several packs in one build; their items are listed by each pack and unioned in Ray Data."""

    def __init__(self, spec: str):
        self.names = parse(spec)
        self.spec = "+".join(self.names)
        self.parts = [open_pack(name) for name in self.names]  # every missing install is reported before Ray

    def dataset(self, limit: int | None = None):
        datasets = [part.dataset(n) for part, n in zip(self.parts, shares(limit, len(self.parts))) if n != 0]
        return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
