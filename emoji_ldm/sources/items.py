"""The item a source lists (one picture, its bytes not yet read), and the error of reading one.

A leaf of `emoji_ldm.sources`: the sources that draw their pictures in the ingest tasks (synthetic, noto,
openmoji) import it, and `base.fetch_bytes` imports them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa

# The items a source lists: one row per picture, its bytes not yet read.
ITEM_SCHEMA = pa.schema([
    ("locator", pa.string()),  # a local path, an http(s) URL, synthetic:SEED:I, noto:CODEPOINTS:FONT or openmoji:SVG
    ("source", pa.string()),  # the spec that listed it, e.g. "twemoji" or "dir:/data/pack"
    ("source_url", pa.string()),  # where the picture came from (the locator when null)
    ("page_url", pa.string()),  # the web page it was found on (crawls)
    ("title", pa.string()),
    ("tag", pa.string()),
    ("caption", pa.string()),  # a caption the source already has (metadata.csv `prompt`)
])


@dataclass(frozen=True)
class SourceItem:
    locator: str  # a local path or an http(s) URL
    source: str  # the spec that listed it, e.g. "twemoji" or "dir:/data/pack"
    title: str = ""
    tag: str = ""
    caption: str | None = None  # a caption the source already has (metadata.csv `prompt`)
    source_url: str | None = None  # where the picture came from, when not the locator
    page_url: str | None = None  # the web page it was found on (crawls)

    def to_row(self) -> dict:
        row = asdict(self)
        row["source_url"] = self.source_url or self.locator
        return row


class FetchError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def items_dataset(rows: list[dict], rows_per_block: int = 128):
    """A Ray Dataset of a short, bounded list of item rows (a package's pack, a test), in blocks that
    spread over the ingest tasks."""
    import ray.data

    table = pa.Table.from_pylist([{k: r.get(k) for k in ITEM_SCHEMA.names} for r in rows], schema=ITEM_SCHEMA)
    blocks = [table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)]
    return ray.data.from_arrow(blocks)
