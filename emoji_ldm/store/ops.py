"""The dataset operations beyond build, as the Python API: versions, show, diff, tag, restore.

The `emoji-ldm dataset versions|show|diff|tag|restore` commands (`emoji_ldm/cli/dataset.py`) print what these
return; the contact sheet is drawn by `sheet.py` and a diff's ids are compared by `joins.py`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from deltalake.transaction import CommitProperties

from emoji_ldm.store.delta import META_KEY, arrow_dataset, history, open_table
from emoji_ldm.store.joins import changed_files, ids_not_in
from emoji_ldm.store.log import file_actions
from emoji_ldm.store.schema import value_counts
from emoji_ldm.store.sheet import contact_sheet
from emoji_ldm.store.sidecar import check_tag_name, image_mode, write_tag
from emoji_ldm.store.uri import DatasetRef, normalize_uri
from emoji_ldm.version import code_version


def versions(uri: str, limit: int | None = None) -> list[dict]:
    """The newest `limit` versions (all when None), oldest first: version, time, operation, rows
    added/removed, message. Reads only those commits of the log."""
    return history(uri, limit=limit)


def format_versions(rows: list[dict]) -> str:
    lines = [f"{'version':>7}  {'time (UTC)':19}  {'operation':10}  {'added':>6}  {'removed':>7}  message"]
    for r in rows:
        lines.append(
            f"{r['version']:>7}  {r['time']:%Y-%m-%d %H:%M:%S}  {r['operation']:10}  "
            f"{r['rows_added']:>6}  {r['rows_removed']:>7}  {r['message']}"
        )
    return "\n".join(lines)


@dataclass
class DatasetSummary:
    ref: str
    version: int
    rows: int
    sources: dict[str, int]
    tags: dict[str, int]
    captioned: int
    image_sizes: dict[str, int]
    image_mode: str = "RGB"  # RGBA, or RGB (built with --background)

    def text(self) -> str:
        top_tags = ", ".join(f"{k or '(none)'} {v}" for k, v in Counter(self.tags).most_common(8))
        sources = ", ".join(f"{k} {v}" for k, v in self.sources.items())
        sizes = ", ".join(f"{k} {v}" for k, v in self.image_sizes.items())
        return "\n".join(
            [
                f"dataset {self.ref} (version {self.version}): {self.rows} rows",
                f"  sources:   {sources}",
                f"  tags:      {top_tags}",
                f"  captioned: {self.captioned}/{self.rows}",
                f"  images:    {sizes}, {self.image_mode}",
            ]
        )


def show(ref: str | DatasetRef, sheet: str | None = None, sheet_count: int = 64) -> DatasetSummary:
    """Summarise a version; with `sheet`, also write a contact sheet PNG of the first images.

    The counts stream over the small columns batch by batch (memory grows with the distinct
    sources, tags and sizes, not with the rows); the sheet reads only the rows it draws.
    """
    ref = DatasetRef.parse(ref) if isinstance(ref, str) else ref
    table = open_table(ref)
    data = arrow_dataset(table)
    rows, captioned = 0, 0
    sources, tags, sizes = Counter(), Counter(), Counter()
    for batch in data.to_batches(columns=["source", "tag", "caption", "width", "height"]):
        rows += batch.num_rows
        captioned += batch.num_rows - batch.column("caption").null_count
        for counter, column in ((sources, "source"), (tags, "tag")):
            counter.update(value_counts(batch.column(column)))
        wh = pc.binary_join_element_wise(pc.cast(batch.column("width"), pa.string()),
                                         pc.cast(batch.column("height"), pa.string()), "x")
        sizes.update(value_counts(wh))
    summary = DatasetSummary(ref=str(ref), version=table.version(), rows=rows, sources=dict(sources),
                             tags=dict(tags), captioned=captioned, image_sizes=dict(sizes),
                             image_mode=image_mode(ref.uri))
    if sheet:
        contact_sheet(data.head(sheet_count, columns=["image", "title", "caption"]), sheet)
    return summary


@dataclass
class Diff:
    a: int
    b: int
    added: int  # rows (content hashes) in b, not in a
    removed: int
    added_sample: list[str]  # up to `sample` of each, to print
    removed_sample: list[str]

    def text(self) -> str:
        return (f"diff {self.a} -> {self.b}: {self.added} rows added, {self.removed} rows removed "
                "(by content hash)")


def diff(uri: str, a: str, b: str, sample: int = 10) -> Diff:
    """Rows (content hashes) added and removed from version/tag `a` to `b`.

    Only the data files that differ between the two versions are read (from the Delta log: an append
    adds files, a caption pass swaps some, a restore swaps back); their ids are compared with Ray
    Data anti-joins. Cost: O(files) on the driver plus O(rows in the changed files) in Ray.
    """
    uri = normalize_uri(uri)
    ta, tb = open_table(DatasetRef.parse(f"{uri}@{a}")), open_table(DatasetRef.parse(f"{uri}@{b}"))
    files_a, files_b = file_actions(ta), file_actions(tb)
    (only_a, rows_a), (only_b, rows_b) = changed_files(files_a, files_b), changed_files(files_b, files_a)
    added, added_sample = ids_not_in(uri, only_b, only_a, rows_a + rows_b, sample)
    removed, removed_sample = ids_not_in(uri, only_a, only_b, rows_a + rows_b, sample)
    return Diff(ta.version(), tb.version(), added, removed, added_sample, removed_sample)


def tag(uri: str, name: str, version: int) -> None:
    """Name a version (`uri@name` then reads it); re-tagging moves the name."""
    check_tag_name(name)
    uri = normalize_uri(uri)
    open_table(DatasetRef(uri, version=version))  # the version exists, or a clear error
    write_tag(uri, name, version)


def restore(uri: str, version: int, message: str = "") -> int:
    """Make `version`'s rows current again, as a new version; returns that new version."""
    uri = normalize_uri(uri)
    open_table(DatasetRef(uri, version=version))  # validates the version with a clear error
    table = open_table(DatasetRef(uri))
    change = diff(uri, str(table.version()), str(version), sample=0)
    meta = {"operation": "restore", "restored_version": version, "code_version": code_version(),
            "counts": {"added": change.added, "removed": change.removed},
            "message": message or f"restore version {version}"}
    table.restore(version, commit_properties=CommitProperties(custom_metadata={META_KEY: meta}))
    return open_table(DatasetRef(uri)).version()
