"""Dataset sources: where the raw image bytes of a build come from.

Input: a source spec (`twemoji`, `noto`, `openmoji` or several joined by '+', `dir:PATH`, `urls:FILE`,
`synthetic:N[:SEED]`).
Output: a Ray Dataset of items (`ITEM_SCHEMA`: locator + metadata), never a
list on the driver: folders are listed in tasks, URL lists are read with Ray
Data's readers (local or `s3://`), the synthetic source is `ray.data.range(N)`,
and the emoji sets a package ships (at most a few thousand items each) are
listed once on the driver. The bytes are read, downloaded, drawn (synthetic,
a font's glyphs) or rasterised (SVGs) later, in the ingest tasks
(`emoji_ldm.ingest.tasks.ingest_batch` through `fetch_bytes`).

`open_source(spec)` validates a spec on the driver (no Ray, reads at most the
head of a list file); `source_dataset(spec, limit)` returns the dataset.
"""

from __future__ import annotations

from emoji_ldm.errors import UserError
from emoji_ldm.sources.base import ITEM_SCHEMA, FetchConfig, SourceItem, fetch_bytes

__all__ = ["FetchConfig", "ITEM_SCHEMA", "SourceItem", "fetch_bytes", "open_source", "source_dataset"]

SOURCE_KINDS = ("twemoji", "noto", "openmoji", "SET+SET (e.g. twemoji+noto+openmoji)", "dir:PATH", "urls:FILE",
                "synthetic:N[:SEED]")


def open_source(spec: str):
    """The source a spec names, checked now (a missing folder, an unreadable list, a bad N)."""
    from emoji_ldm.sources import combined, folder, synthetic, urls

    if spec in combined.PACKS:
        return combined.open_pack(spec)
    if combined.is_combined(spec):
        return combined.CombinedSource(spec)
    if spec.startswith("dir:"):
        return folder.FolderSource(spec[len("dir:"):])
    if spec.startswith("urls:"):
        return urls.UrlListSource(spec[len("urls:"):])
    if spec.startswith("synthetic:"):
        return synthetic.SyntheticSource(spec)
    raise UserError(f"unknown source {spec!r}: use one of {', '.join(SOURCE_KINDS)}")


def source_dataset(spec: str, limit: int | None = None):
    """A Ray Dataset of the spec's items (`ITEM_SCHEMA` columns), at most `limit` of them."""
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be a positive number of images, got {limit}")
    return open_source(spec).dataset(limit)
