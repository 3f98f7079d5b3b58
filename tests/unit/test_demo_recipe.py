"""`make demo`'s recipe pieces: the Twemoji subset it trains on, the set preview of its last lines, its options."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "infra" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skin_tone_variants_are_left_out(tmp_path, monkeypatch):
    from emoji_ldm.sources import twemoji
    from emoji_ldm.sources.base import SourceItem

    subset = _module("demo_twemoji")
    assert subset.SKIN_TONES == twemoji._SKIN_TONES  # the same five modifiers the source knows
    assert subset.has_skin_tone("1f44d-1f3fd") and subset.has_skin_tone("1F9D1-1F3FB-200D-1F4BB")
    assert not subset.has_skin_tone("1f44d") and not subset.has_skin_tone("2764-fe0f")
    pack = tmp_path / "pack"
    pack.mkdir()
    items = []
    for stem, title in (("2764", "red heart"), ("1f44d", "thumbs up"), ("1f44d-1f3fd", "thumbs up: medium")):
        Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(pack / f"{stem}.png")
        items.append(SourceItem(locator=str(pack / f"{stem}.png"), source="twemoji", title=title, tag="Symbols",
                                source_url=f"{twemoji.UPSTREAM}/{stem}.png"))
    monkeypatch.setattr(twemoji, "twemoji_items", lambda: items)
    out = tmp_path / "base"
    assert subset.write_subset(out) == 2
    assert sorted(p.name for p in out.glob("*.png")) == ["1f44d.png", "2764.png"]
    with open(out / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # the title, tag and upstream URL `--source twemoji` gives: the same captions and judge classes
    assert rows[0] == {"file_name": "2764.png", "image_url": f"{twemoji.UPSTREAM}/2764.png",
                       "image_title": "red heart", "tag": "Symbols"}


def test_the_everyday_subset_keeps_smileys_and_the_naming_emojis_subgroups(tmp_path, monkeypatch):
    from emoji_ldm.eval.naming import NAMING
    from emoji_ldm.sources import twemoji
    from emoji_ldm.sources.base import SourceItem

    subset = _module("demo_twemoji")
    assert {"animal-mammal", "heart", "sky & weather", "food-fruit"} <= subset.everyday_subgroups()
    assert len(NAMING) == 24
    pack = tmp_path / "pack"
    pack.mkdir()
    items = []
    for stem, title, tag in (("1f600", "grinning face", "Smileys & Emotion"),  # a smiley, not in the test
                             ("1f42d", "mouse face", "Animals & Nature"),  # the cat face's subgroup
                             ("1f6a2", "ship", "Travel & Places"),  # transport-water: no naming emoji
                             ("1f9ee", "abacus", "Objects")):
        Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(pack / f"{stem}.png")
        items.append(SourceItem(locator=str(pack / f"{stem}.png"), source="twemoji", title=title, tag=tag,
                                source_url=f"{twemoji.UPSTREAM}/{stem}.png"))
    monkeypatch.setattr(twemoji, "twemoji_items", lambda: items)
    assert subset.write_subset(tmp_path / "everyday", "everyday") == 2
    assert sorted(p.name for p in (tmp_path / "everyday").glob("*.png")) == ["1f42d.png", "1f600.png"]


def test_the_set_is_drawn_over_a_checkerboard(tmp_path):
    show = _module("show_set")
    red = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    red.paste((255, 0, 0, 255), (4, 4, 28, 28))  # a red square on transparency
    red.save(tmp_path / "red_heart.png")
    Image.new("RGBA", (32, 32), (0, 0, 255, 255)).save(tmp_path / "blue_heart.png")
    Image.new("RGB", (64, 32), "white").save(tmp_path / "sheet.png")
    (tmp_path / "manifest.json").write_text(json.dumps({"items": [{"file": "red_heart.png"},
                                                                  {"file": "blue_heart.png"}]}))
    images, names = show.set_images(tmp_path)
    assert names == ["red_heart", "blue_heart"]  # the manifest's order, the sheet left out
    text = show.render(images, names, px=10)
    lines = text.splitlines()
    assert len(lines) == 5 + 1 and lines[-1].split() == ["red_heart", "blue_heart"]  # 2 pixel rows a line
    first = lines[0].split(" ")[0]  # the red emoji's top rows: transparent, so the checkerboard's two greys
    assert "255;255;255m" in first and "204;204;204m" in first and "255;0;0m" not in first
    assert "255;0;0m" in lines[2]  # its middle: red
    assert "0;0;255m" in lines[0].split(" ")[1]  # the opaque blue one: blue from its first row
    assert show.main([str(tmp_path), "--px", "4"]) == 0


@pytest.mark.parametrize("value", ["some", "skin"])
def test_demo_refuses_an_unknown_twemoji_subset(tmp_path, value):
    env = {**os.environ, "DEMO_TWEMOJI": value}
    r = subprocess.run(["bash", str(REPO / "infra" / "demo.sh"), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"DEMO_TWEMOJI must be base, everyday or all, got '{value}'" in r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("value", ["high", "2,5", "-1"])
def test_demo_refuses_a_guidance_that_is_not_a_number(tmp_path, value):
    env = {**os.environ, "DEMO_GUIDANCE": value}
    r = subprocess.run(["bash", str(REPO / "infra" / "demo.sh"), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"DEMO_GUIDANCE must be a number such as 2.5, got '{value}'" in r.stderr
    assert not (tmp_path / "out").exists()
