"""The blind naming test: 24 everyday emoji, typed as a user types them (their CLDR names), one image each, shown to
a reader who has not seen the prompts, with 4 options per tile. The reader also says which tiles they truly
recognise, rather than guess from colour (issue 65's done-when: 20 of 24 named, 12 recognised; chance is 6).

`naming_sheet()` gives the tiles (a fixed order and fixed options); the sheet's drawing is the caller's (`make
gpu-train`, `bench/naming.py`); `score` reads a reader's answers against the key.
"""

from __future__ import annotations

import random

NAMING = ("grinning face", "red heart", "cat face", "dog face", "pizza", "thumbs up", "ghost", "fire", "sun",
          "rocket", "birthday cake", "pile of poo", "face with tears of joy", "rainbow", "banana", "red apple",
          "snowman", "light bulb", "crown", "soccer ball", "party popper", "clapping hands", "hot beverage",
          "alarm clock")
NAMING_SEED = 64  # the sheet's order and each tile's options
INSTRUCTIONS = ("name each numbered tile from its 4 options, and say whether you truly recognise it (you would "
                "name it without the options) or are guessing from colour or outline")


def naming_sheet(names: tuple[str, ...] = NAMING, seed: int = NAMING_SEED) -> list[dict]:
    """The tiles: the names shuffled with a fixed seed, each with 4 options (its answer and 3 other names of the
    sheet, shuffled); tiles are numbered from 1, left to right, top to bottom."""
    rng = random.Random(seed)
    order = list(names)
    rng.shuffle(order)
    tiles = []
    for i, answer in enumerate(order):
        options = [answer] + rng.sample([n for n in names if n != answer], 3)
        rng.shuffle(options)
        tiles.append({"tile": i + 1, "answer": answer, "options": options})
    return tiles


def options_only(tiles: list[dict]) -> dict:
    """What the reader gets: the instructions and each tile's options, no answers."""
    return {"instructions": INSTRUCTIONS, "tiles": [{"tile": t["tile"], "options": t["options"]} for t in tiles]}


def score(tiles: list[dict], answers: list[dict]) -> dict:
    """`answers`: [{"tile": 1, "choice": "cat face", "recognised": true}, ...] -> named / recognised counts (a tile
    counts as recognised only when it is also named right) and the tiles of each."""
    key = {t["tile"]: t["answer"] for t in tiles}
    by_tile = {a["tile"]: a for a in answers}
    missing = sorted(set(key) - set(by_tile))
    if missing:
        raise ValueError(f"no answer for tiles {missing}")
    named = [key[t] for t in sorted(key) if by_tile[t]["choice"] == key[t]]
    recognised = [key[t] for t in sorted(key) if by_tile[t]["choice"] == key[t] and by_tile[t].get("recognised")]
    return {"tiles": len(key), "named": len(named), "recognised": len(recognised), "chance": len(key) / 4,
            "named_tiles": named, "recognised_tiles": recognised}
