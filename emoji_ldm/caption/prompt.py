"""The captioning instruction (the seed's structured prompt) and output cleaning."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from emoji_ldm.errors import UserError

# The seed's instruction: seven facts in a fixed sentence shape, with its Pepe example.
DEFAULT_TEMPLATE = (
    "This emoji is titled '{title}'. Describe the image: 1) head shape, 2) eyes, 3) mouth, "
    "4) expression, 5) skin colour, 6) action if any, 7) background colour. "
    "Answer with one sentence in exactly this form: "
    "'{title} emoji with a <head shape>, <eyes> eyes, <mouth> mouth, <expression> expression, "
    "<skin colour> skin colour, <action>, with a <background colour> background.' "
    "For example: 'pepe emoji with a round head, big droopy eyes, wide frowning mouth, sad expression, "
    "green skin colour, crying, with a white background.'"
)

MAX_CAPTION_CHARS = 300
_MARKUP = re.compile(r"<\|[^|>]*\|>|</?(?:s|think)>")


def load_template(path: str | None) -> str:
    """The default instruction, or a user's template file; it must use {title} and nothing else in braces."""
    if path is None:
        return DEFAULT_TEMPLATE
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--template {path!r} does not exist")
    template = p.read_text().strip()
    check_template(template, path)
    return template


def check_template(template: str, where: str = "template") -> None:
    if "{title}" not in template:
        raise UserError(f"{where}: the template must contain {{title}} (where the emoji's title goes)")
    try:
        template.format(title="x")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"{where}: only {{title}} may appear in braces (write {{{{ }}}} for a literal brace): "
                        f"{e!r}") from None


def prompt_id(template: str) -> str:
    """A short, stable name of the instruction, stored with every caption it produced."""
    return hashlib.sha1(template.encode()).hexdigest()[:12]


def render(template: str, title: str | None) -> str:
    return template.format(title=(title or "untitled").strip())


def clean_caption(text: str, limit: int = MAX_CAPTION_CHARS) -> str:
    """One line of plain text: no chat markup, no wrapping quotes, at most `limit` characters."""
    text = _MARKUP.sub(" ", text)
    text = text.replace("assistant\n", " ")
    text = " ".join(text.split())
    text = text.strip(" '\"`")
    if len(text) > limit:
        cut = text[:limit].rsplit(" ", 1)[0]
        text = cut.rstrip(",;: ")
    return text
