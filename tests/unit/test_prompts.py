"""Prompts as users type them reach a model in the form of the captions it trained on (inference/prompts.py)."""

from __future__ import annotations

import json

import pytest

from emoji_ldm.inference.prompts import caption_forms, caption_style, clean, model_prompt
from emoji_ldm.inference.sampler import SampleJob, Sampler
from tests.tiny_models import tiny_model_with_card


@pytest.mark.parametrize("typed, seen", [
    ("cat face", "cat face emoji (animals & nature)"),
    ("Purple  Cat Face", "cat face emoji (animals & nature), purple"),
    ("bright green ghost", "ghost emoji (smileys & emotion), bright green"),
    ("red heart", "red heart emoji (smileys & emotion)"),  # a name that starts with a colour stays one name
    ("sob", "loudly crying face emoji (smileys & emotion)"),  # the emoji package's aliases
    (":heart_eyes:", "smiling face with heart-eyes emoji (smileys & emotion)"),
    ("🍕", "pizza emoji (food & drink)"),
    ("thumbs up", "thumbs up emoji (people & body)"),
])
def test_names_and_colours_take_the_metadata_captions_form(typed, seen):
    assert model_prompt(typed, "metadata") == seen


@pytest.mark.parametrize("typed", [
    "a dragon wearing a tiny hat",  # no emoji has this name
    "cat face emoji (animals & nature), orange, on a transparent background",  # already a caption
    "purple",  # colour words alone name nothing
])
def test_anything_else_reaches_the_model_as_typed(typed):
    assert model_prompt(typed, "metadata") == typed


def test_as_typed_models_get_only_cleaning():
    assert model_prompt("cat face", "as-typed") == "cat face"
    assert model_prompt("cat\x1b[31m  face\u202e\n", "as-typed") == "cat[31m face"


def test_control_and_format_characters_are_removed_but_emoji_sequences_kept():
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ sequence
    assert clean(f"a\x00b\x07c {family}\u2066") == f"abc {family}"


def test_an_unknown_style_is_refused_with_its_value():
    with pytest.raises(ValueError, match="'fancy'"):
        model_prompt("cat face", "fancy")


def test_caption_style_tells_metadata_captions_from_free_text():
    metadata = ["red heart emoji (smileys & emotion), bright red, on a transparent background",
                "joker emoji (activities), white and orange, on a busy background"]
    assert caption_style(metadata) == "metadata"
    assert caption_style(["A smiling yellow cat with closed eyes.", *metadata]) == "as-typed"
    assert caption_style([]) == "as-typed"


@pytest.mark.parametrize("typed", ["cat face", "family: man, woman, boy", "red heart"])
def test_a_metadata_model_trains_on_the_prompt_a_typed_name_becomes(typed):
    """The second form of a metadata caption is exactly what `model_prompt` makes of its name typed alone."""
    seen = model_prompt(typed, "metadata")
    head = seen if seen != typed else f"{typed} emoji (people & body)"  # a name the vocabulary misses: any group
    caption = f"{head}, bright yellow and brown, on a transparent background"
    assert caption_forms(caption, "metadata") == [caption, head]


def test_other_captions_train_as_themselves():
    assert caption_forms("A smiling yellow cat, with closed eyes.", "metadata") == ["A smiling yellow cat, with "
                                                                                  "closed eyes."] * 2
    assert caption_forms("cat face emoji (animals & nature), orange, on a transparent background",
                         "as-typed") == ["cat face emoji (animals & nature), orange, on a transparent background"]
    with pytest.raises(ValueError, match="'fancy'"):
        caption_forms("cat face", "fancy")


def test_the_sampler_gives_the_model_the_card_styles_prompt(tmp_path):
    folder = tiny_model_with_card(tmp_path / "model")
    card_path = folder / "model_card.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "prompt_style": "metadata"}))
    sampler = Sampler.load(str(folder))
    seen = []
    original = sampler.pipe.__call__
    sampler.pipe.__class__ = type("Spy", (type(sampler.pipe),),
                                  {"__call__": lambda self, prompts, **kw: seen.append(prompts) or original(prompts,
                                                                                                          **kw)})
    images = sampler.sample([SampleJob(("cat face", "a dragon"), (0, 1), "", 2, 3.0)])
    assert seen == [["cat face emoji (animals & nature)", "a dragon"]]
    assert len(images[0]) == 2
