"""Prompts as users type them, in the form of the captions the model trained on.

A model trained on the `metadata` captioner's captions ("cat face emoji (smileys & emotion), bright yellow
and orange, on a transparent background") has seen no prompt as short as "cat face". Its card records
`prompt_style: metadata`, and every route that samples it (`generate`, serve, durable jobs, bulk, eval) passes
the typed prompt through `model_prompt`, which writes a bare emoji name, with or without colour words, the way
those captions begin:

    "cat face"         -> "cat face emoji (smileys & emotion)"
    "Purple cat face"  -> "cat face emoji (smileys & emotion), purple"
    ":sob:" / "sob"    -> "loudly crying face emoji (smileys & emotion)"   (the `emoji` package's aliases)
    "🍕"               -> "pizza emoji (food & drink)"

Anything else (a prompt already in caption form, a sentence, a name no emoji has) reaches the model as typed,
less control characters and runs of white space. Models whose captions are free text (Qwen2.5-VL, vLLM, a
folder's own) have `prompt_style: as-typed` and get only that cleaning. The PNG records the typed prompt and,
where it differs, the one the model saw.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from emoji_ldm.cldr import codepoints, groups, key

STYLES = ("as-typed", "metadata")
# the metadata captioner's colour words (caption/metadata.py `colour_name`), as a user may put them first
COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "brown", "black", "white", "grey",
           "gray", "gold", "silver")
SHADES = ("bright", "dark", "pale", "light")
# "cat face emoji (smileys & emotion), ..., on a transparent background": what a metadata caption looks like
_METADATA_CAPTION = re.compile(r"^.+ emoji(?: \([^)]*\))?, .*\bon an? .+ background$")
# its head, the form a typed name takes: "cat face emoji (smileys & emotion)"
_NAME_FORM = re.compile(r"^(.+? emoji(?: \([^)]*\))?), ")
FORMS = {"as-typed": 1, "metadata": 2}  # the caption forms a model of each style trains on (`caption_forms`)


def clean(prompt: str) -> str:
    """Control and format characters out (they could forge PNG text chunks or hide text), white space folded.
    Zero-width joiners stay: they are part of emoji sequences."""
    kept = "".join(ch for ch in prompt if ch == "\u200d" or unicodedata.category(ch)[0] != "C" or ch in "\t\n")
    return " ".join(kept.split())


def spoken(name: str) -> str:
    """":smiling_face_with_heart-eyes:" -> "smiling face with heart-eyes" (lower-case, no colons)."""
    return " ".join(name.strip(":").replace("_", " ").lower().split())


@functools.lru_cache(maxsize=1)
def vocabulary() -> dict[str, tuple[str, str]]:
    """Every name and alias the `emoji` package knows, and each emoji itself -> (CLDR name, Unicode group)."""
    import emoji

    by_key = groups()
    out: dict[str, tuple[str, str]] = {}
    for char, data in emoji.EMOJI_DATA.items():
        entry = (spoken(data["en"]), by_key.get(key(codepoints(char)), ""))
        out.setdefault(spoken(data["en"]), entry)  # CLDR names first: an alias never shadows a name
    for char, data in emoji.EMOJI_DATA.items():
        entry = out[spoken(data["en"])]
        for alias in data.get("alias", []):
            out.setdefault(spoken(alias), entry)
        out.setdefault(char, entry)
        out.setdefault(char.replace("\ufe0f", ""), entry)
    return out


def split_colours(text: str) -> tuple[str, str]:
    """"bright purple cat face" -> ("bright purple", "cat face"); leading colour words only."""
    words = text.split()
    n = 0
    while n < len(words) and (words[n] in COLOURS or (words[n] in SHADES and n + 1 < len(words)
                                                        and words[n + 1] in COLOURS)):
        n += 1
    return " ".join(words[:n]), " ".join(words[n:])


def in_metadata_form(name: str, group: str, colours: str = "") -> str:
    head = f"{name} emoji ({group.lower()})" if group else f"{name} emoji"
    return f"{head}, {colours}" if colours else head


def model_prompt(prompt: str, style: str) -> str:
    """The prompt the model is given for `prompt` as typed (see the module docstring)."""
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r}: one of {', '.join(STYLES)}")
    text = clean(prompt)
    if style == "as-typed" or not text:
        return text
    words = spoken(text)
    if " emoji" in f" {words}":  # already says what it is: a caption, or the user's own phrasing
        return text
    names = vocabulary()
    if words in names:  # a whole name wins over a colour prefix: "red heart", "black cat", "green apple"
        return in_metadata_form(*names[words])
    colours, rest = split_colours(words)
    if colours and rest in names:
        return in_metadata_form(*names[rest], colours)
    return text


def caption_forms(caption: str, style: str) -> list[str]:
    """The `FORMS[style]` texts a caption is trained as, one drawn per image and step.

    `metadata`: the caption, then its name form, the prompt a typed name becomes (`model_prompt`):
    "cat face emoji (smileys & emotion), bright yellow, on a transparent background" -> [that,
    "cat face emoji (smileys & emotion)"]. A model trained on whole captions alone draws a typed "cat face"
    from a text it never saw. A caption not in the metadata form is its own name form. `as-typed`: [caption].
    """
    if style not in FORMS:
        raise ValueError(f"caption style {style!r}: one of {', '.join(FORMS)}")
    if FORMS[style] == 1:
        return [caption]
    head = _NAME_FORM.match(caption) if _METADATA_CAPTION.match(caption) else None
    return [caption, head[1] if head else caption]


def caption_style(captions: list[str]) -> str:
    """`metadata` when (nearly) every caption is the metadata captioner's, else `as-typed`: for a model card."""
    captions = [c for c in captions if c]
    if captions and sum(bool(_METADATA_CAPTION.match(c)) for c in captions) >= 0.9 * len(captions):
        return "metadata"
    return "as-typed"
