"""Dataset commands beyond build: versions, show (+ contact sheet), diff, tag, restore.

Each is one typed function that the CLI calls as it is
(`emoji-ldm dataset versions|show|diff|tag|restore`).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from deltalake.transaction import CommitProperties
from PIL import Image, ImageDraw, ImageFont

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.imaging import on_checkerboard
from emoji_ldm.store.delta import META_KEY, arrow_dataset, history, open_table
from emoji_ldm.store.log import file_actions
from emoji_ldm.store.schema import value_counts
from emoji_ldm.store.sidecar import image_mode, write_tag
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


def contact_sheet(rows: pa.Table, path: str, cell: int = 128, columns: int = 8) -> None:
    """A grid of images, each with its caption (or title) underneath."""
    if rows.num_rows == 0:
        raise UserError("the dataset has no rows to put on a contact sheet")
    font = ImageFont.load_default()
    label_h = 28
    n = rows.num_rows
    cols = min(columns, n)
    grid_rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, grid_rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows.to_pylist()):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        img = Image.open(io.BytesIO(row["image"]))
        pad = 8
        img = img.resize((cell - 2 * pad, cell - 2 * pad), Image.Resampling.NEAREST)
        sheet.paste(on_checkerboard(img, cell=8) if "A" in img.mode or "transparency" in img.info
                    else img.convert("RGB"), (x + pad, y + pad))
        label = (row.get("caption") or row.get("title") or "")[:44]
        for j, part in enumerate((label[:22], label[22:44])):
            draw.text((x + 4, y + cell - 2 + j * 12), part, fill="black", font=font)
    sheet.save(path)


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


ID_BYTES = 80  # an `id` (64 hex characters) in a shuffle


def _changed(files: pa.Table, other: pa.Table) -> tuple[list[str], int]:
    """The data files of `files` (the log's add actions) that `other` does not hold, and their rows."""
    only = files.filter(pc.invert(pc.is_in(files.column("path"), value_set=other.column("path"))))
    return only.column("path").to_pylist(), int(pc.sum(pc.fill_null(only.column("num_records"), 0)).as_py() or 0)


def diff(uri: str, a: str, b: str, sample: int = 10) -> Diff:
    """Rows (content hashes) added and removed from version/tag `a` to `b`.

    Only the data files that differ between the two versions are read (from the Delta log: an append
    adds files, a caption pass swaps some, a restore swaps back); their ids are compared with Ray
    Data anti-joins. Cost: O(files) on the driver plus O(rows in the changed files) in Ray.
    """
    uri = normalize_uri(uri)
    ta, tb = open_table(DatasetRef.parse(f"{uri}@{a}")), open_table(DatasetRef.parse(f"{uri}@{b}"))
    files_a, files_b = file_actions(ta), file_actions(tb)
    (only_a, rows_a), (only_b, rows_b) = _changed(files_a, files_b), _changed(files_b, files_a)
    added, added_sample = _ids_not_in(uri, only_b, only_a, rows_a + rows_b, sample)
    removed, removed_sample = _ids_not_in(uri, only_a, only_b, rows_a + rows_b, sample)
    return Diff(ta.version(), tb.version(), added, removed, added_sample, removed_sample)


def _ids_not_in(uri: str, files: list[str], other: list[str], rows: int, sample: int) -> tuple[int, list[str]]:
    """How many ids of `files` are in none of `other` (data files of the table, `rows` in both), and a sorted
    sample."""
    if not files:
        return 0, []
    import ray.data

    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.partitions import shuffle_partitions
    from emoji_ldm.store.uri import filesystem

    ensure_ray()
    fs, root = filesystem(uri)

    def ids(paths: list[str]):
        return ray.data.read_parquet([f"{root.rstrip('/')}/{p}" for p in paths], filesystem=fs).select_columns(["id"])

    found = ids(files)
    if other:  # materialized: counting and sampling read the join's output, not run it twice
        found = found.join(ids(other), "left_anti", num_partitions=shuffle_partitions(rows * ID_BYTES),
                           on=("id",)).materialize()
    count = found.count()
    return count, sorted(r["id"] for r in found.take(sample)) if sample and count else []


def tag(uri: str, name: str, version: int) -> None:
    """Name a version (`uri@name` then reads it); re-tagging moves the name."""
    write_tag(normalize_uri(uri), name, version)


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


# --- the `emoji-ldm dataset ...` commands: a config each, a function that returns the text to print ---


def _check_version(version: int | None) -> None:
    if version is not None and version < 0:
        raise UserError(f"version {version} must be 0 or more")


@dataclass(frozen=True)
class VersionsConfig:
    uri: str = opt(positional=True, help="dataset URI")
    limit: int = opt(20, help="print the newest N versions")

    def __post_init__(self):
        if self.limit < 1:
            raise UserError(f"--limit must be 1 or more, got {self.limit}")


def versions_text(config: VersionsConfig) -> str:
    rows = versions(config.uri, limit=config.limit)
    text = format_versions(rows)
    if rows and rows[0]["version"] > 0:
        text += f"\n(the newest {len(rows)}; --limit N shows more)"
    return text


@dataclass(frozen=True)
class ShowConfig:
    uri: str = opt(positional=True, help="URI, URI@VERSION or URI@TAG")
    version: int | None = opt(None, help="version number to show")
    tag: str | None = opt(None, help="tag name to show")
    sheet: str | None = opt(None, help="write a contact sheet of images with titles/captions to this PNG")
    sheet_count: int = opt(64, help="images on the sheet")

    def __post_init__(self):
        if self.version is not None and self.tag is not None:
            raise UserError("give --version or --tag, not both")
        _check_version(self.version)
        if self.sheet_count < 1:
            raise UserError(f"--sheet-count must be 1 or more, got {self.sheet_count}")


def show_command(config: ShowConfig) -> str:
    ref = DatasetRef.parse(config.uri)
    if config.version is not None or config.tag is not None:
        ref = DatasetRef(normalize_uri(ref.uri), version=config.version, tag=config.tag)
    text = show(ref, sheet=config.sheet, sheet_count=config.sheet_count).text()
    return text + (f"\ncontact sheet: {config.sheet}" if config.sheet else "")


@dataclass(frozen=True)
class DiffConfig:
    uri: str = opt(positional=True, help="dataset URI")
    a: str = opt(positional=True, help="version number or tag")
    b: str = opt(positional=True, help="version number or tag")
    show: int = opt(10, help="print up to N ids of each side")


def diff_command(config: DiffConfig) -> str:
    result = diff(config.uri, config.a, config.b, sample=config.show)
    lines = [result.text()]
    lines += [f"+ {id_}" for id_ in result.added_sample]
    lines += [f"- {id_}" for id_ in result.removed_sample]
    return "\n".join(lines)


@dataclass(frozen=True)
class TagConfig:
    uri: str = opt(positional=True, help="dataset URI")
    name: str = opt(positional=True, help="the tag: letters, digits, '_', '.' or '-'")
    version: int = opt(positional=True, help="the version it names")

    def __post_init__(self):
        _check_version(self.version)


def tag_command(config: TagConfig) -> str:
    tag(config.uri, config.name, config.version)
    return (f"tagged version {config.version} of {config.uri} as {config.name!r} "
            f"(read it as {config.uri}@{config.name})")


@dataclass(frozen=True)
class RestoreConfig:
    uri: str = opt(positional=True, help="dataset URI")
    version: int = opt(positional=True, help="the version to make current again")
    message: str = opt("", help="a note recorded with the new version")

    def __post_init__(self):
        _check_version(self.version)


def restore_command(config: RestoreConfig) -> str:
    new = restore(config.uri, config.version, message=config.message)
    return f"restored version {config.version} of {config.uri} as new version {new}"
