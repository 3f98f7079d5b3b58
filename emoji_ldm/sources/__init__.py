"""Dataset sources: where the raw image bytes of a build come from.

Input: a source spec (`twemoji`, `dir:PATH`, `urls:FILE`). Output: a list of
`SourceItem`s (locator + metadata), listed on the driver; the bytes are read
or downloaded later, inside Ray Data tasks (`emoji_ldm.ingest.build`).

Public entry points: `list_source(spec, limit)`, `twemoji_items`, `dir_items`,
`url_items`, and `fetch_bytes(pool, url, config)` (a urllib3 pool from
`make_pool(FetchConfig)`) used by the ingest tasks.
"""

from __future__ import annotations

from emoji_ldm.errors import UserError
from emoji_ldm.sources.base import FetchConfig, SourceItem, fetch_bytes
from emoji_ldm.sources.folder import dir_items
from emoji_ldm.sources.twemoji import twemoji_items
from emoji_ldm.sources.urls import url_items

__all__ = ["FetchConfig", "SourceItem", "fetch_bytes", "list_source", "twemoji_items", "dir_items", "url_items"]

SOURCE_KINDS = ("twemoji", "dir:PATH", "urls:FILE")


def list_source(spec: str, limit: int | None = None) -> list[SourceItem]:
    """Resolve a source spec to its items (at most `limit`)."""
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be a positive number of images, got {limit}")
    if spec == "twemoji":
        items = twemoji_items()
    elif spec.startswith("dir:"):
        items = dir_items(spec[len("dir:"):])
    elif spec.startswith("urls:"):
        items = url_items(spec[len("urls:"):])
    else:
        raise UserError(f"unknown source {spec!r}: use one of {', '.join(SOURCE_KINDS)}")
    return items[:limit] if limit else items
