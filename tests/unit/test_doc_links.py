"""Every relative link of README.md and docs/*.md resolves: the file (or folder) exists, and an anchor names a
heading of the linked page as GitHub spells it."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code spans (no links live there)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (links by their text, no markup), lower case, only letters, digits,
    '_', '-' and spaces, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = prose(page.read_text())
    return [t for t in LINK.findall(text) + REFERENCE.findall(text) if not EXTERNAL.match(t)]


def broken(page: Path) -> list[str]:
    wrong = []
    for target in links(page):
        path, _, anchor = unquote(target).partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            wrong.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            wrong.append(f"{target}: no heading with that anchor in {linked.relative_to(ROOT)}")
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken(page) == []


def test_the_slug_follows_github():
    assert slug("`make test` and `make demo`: wall time") == "make-test-and-make-demo-wall-time"
    assert slug("Captioning: `emoji-ldm dataset caption`") == "captioning-emoji-ldm-dataset-caption"
    assert slug("A model a person recognises: small64, trained on this CPU") == \
        "a-model-a-person-recognises-small64-trained-on-this-cpu"


def layout_files() -> list[str]:
    """The files the package layout of docs/architecture.md names: `name.ext` words under each folder's line."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Package layout", 1)[1].split("```")[1]
    named, folder = [], ""
    for line in block.splitlines()[1:]:
        head = re.match(r"^( {0,2})([\w./-]+/)\s", line + " ")
        if head:
            folder = ("emoji_ldm/" if head.group(1) else "") + head.group(2)
        elif not line.startswith(" "):
            folder = ""
        words = re.sub(r"\([^)]*\)", "", line)  # a parenthesis describes; a name outside one is a file
        for name in re.findall(r"(?<![\w./-])([\w*-]+\.(?:py|html|yaml|md))\b", words):
            if folder and "*" not in name:
                named.append(folder + name)
    return named


def test_the_package_layout_names_only_files_that_exist():
    named = layout_files()
    assert len(named) > 50
    assert [n for n in named if not (ROOT / n).exists()] == []


def test_the_paths_architecture_md_quotes_exist():
    """A path in code quotes (`emoji_ldm/cli/main.py`, `ray_jobs/<stage>.py` aside) names a file of the repository."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    quoted = re.findall(r"`((?:emoji_ldm|ray_jobs|infra|tests|bench|k8s|docs)/[\w./-]+\.\w+)`", text)
    assert len(quoted) > 5
    assert [q for q in quoted if not (ROOT / q).exists()] == []
