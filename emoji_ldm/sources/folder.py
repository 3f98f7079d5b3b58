"""`dir:PATH`: a folder of images, optionally with the seed's `metadata.csv`.

`metadata.csv` columns: `file_name` (the path relative to the folder; for a
file at the top level, its name), `image_url`, `image_title`, `tag` and an
optional `prompt` (kept as the caption). Files it does not name are still
ingested, titled by their file name. Every regular file except hidden ones and
`metadata.csv` is an input: non-images are rejected with a reason at ingest.

The folder is listed in Ray Data tasks, never on the driver: listing task `i`
of `S` scans the top level and takes the entries whose name hashes to `i`,
walking their subfolders. The metadata joins the listing in Ray Data
(`Dataset.join` on the relative path). The folder must be readable from every
node (a shared mount on a multi-node cluster).
"""

from __future__ import annotations

import csv
import os
import zlib
from pathlib import Path

import pyarrow as pa

from emoji_ldm.errors import UserError

METADATA_COLUMNS = ("file_name", "image_url", "image_title", "tag")
_META_KEEP = ("file_name", "image_url", "image_title", "tag", "prompt")
LISTING_SHARDS = 8
_CHUNK = 4096  # rows per listed block
_FILES_SCHEMA = pa.schema([("_path", pa.string()), ("_rel", pa.string())])


def _read_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            columns = next(reader, [])
            for _ in range(100):  # a malformed body is caught early too
                if next(reader, None) is None:
                    break
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save metadata.csv as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path} is not valid CSV: {e}") from None
    if "file_name" not in columns:
        raise UserError(
            f"{path} has no 'file_name' column (columns: {columns}); "
            f"expected {', '.join(METADATA_COLUMNS)} and optional prompt"
        )
    return columns


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk(root: str, first: os.DirEntry):
    """Visible files under one top-level entry: (absolute path, path relative to root)."""
    if first.is_file():
        yield first.path, first.name
        return
    if not first.is_dir():
        return
    for folder, dirs, files in os.walk(first.path):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        for name in sorted(files):
            if _visible(name):
                path = os.path.join(folder, name)
                yield path, os.path.relpath(path, root).replace(os.sep, "/")


def list_shard(batch: dict, root: str, shards: int):
    """Ray Data task: the files of listing shard(s) `batch["id"]`, in blocks of `_CHUNK` rows."""
    for shard in batch["id"]:
        paths, rels, listed = [], [], 0
        with os.scandir(root) as entries:
            for entry in entries:
                if not _visible(entry.name) or (entry.name == "metadata.csv" and entry.is_file()):
                    continue
                if zlib.crc32(entry.name.encode()) % shards != int(shard):
                    continue
                for path, rel in _walk(root, entry):
                    paths.append(path)
                    rels.append(rel)
                    if len(paths) >= _CHUNK:
                        yield pa.table({"_path": paths, "_rel": rels}, schema=_FILES_SCHEMA)
                        listed, paths, rels = listed + len(paths), [], []
        if paths or not listed:  # an empty shard still says its columns (the join needs them)
            yield pa.table({"_path": paths, "_rel": rels}, schema=_FILES_SCHEMA)


def to_items(batch: pa.Table, spec: str) -> pa.Table:
    """Ray Data task: listed files (joined with their metadata row, if any) -> item rows."""
    import pyarrow.compute as pc

    from emoji_ldm.sources.base import ITEM_SCHEMA

    n = batch.num_rows

    def column(name: str) -> pa.Array:
        if name not in batch.column_names:
            return pa.nulls(n, pa.string())
        values = pc.cast(batch.column(name), pa.string())
        return pc.if_else(pc.equal(values, ""), pa.nulls(n, pa.string()), values)  # empty cells: no value

    stems = [os.path.splitext(os.path.basename(p))[0].replace("_", " ").replace("-", " ")
             for p in batch.column("_rel").to_pylist()]
    path = batch.column("_path")
    return pa.table({
        "locator": path,
        "source": pa.array([spec] * n, pa.string()),
        "source_url": pc.coalesce(column("image_url"), path),
        "page_url": pa.nulls(n, pa.string()),
        "title": pc.coalesce(column("image_title"), pa.array(stems, pa.string())),
        "tag": pc.coalesce(column("tag"), pa.array([""] * n, pa.string())),
        "caption": column("prompt"),
    }, schema=ITEM_SCHEMA)


class FolderSource:
    def __init__(self, folder: str):
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise UserError(f"dir:{folder}: {root} is not a folder; give dir:PATH with PATH a folder of images")
        self.root = root.resolve()
        self.spec = f"dir:{self.root}"
        self.local_path = str(self.root)
        meta = self.root / "metadata.csv"
        self.meta_columns = _read_header(meta) if meta.is_file() else None
        if not self._any_file():
            raise UserError(f"dir:{folder} holds no files to ingest")

    def _any_file(self) -> bool:
        """Stops at the first file (never lists the whole folder on the driver)."""
        with os.scandir(self.root) as entries:
            for entry in entries:
                if _visible(entry.name) and not (entry.name == "metadata.csv" and entry.is_file()):
                    if next(_walk(str(self.root), entry), None) is not None:
                        return True
        return False

    def dataset(self, limit: int | None = None):
        import pyarrow.csv as pcsv
        import ray.data

        files = ray.data.range(LISTING_SHARDS, override_num_blocks=LISTING_SHARDS).map_batches(
            list_shard, fn_kwargs={"root": str(self.root), "shards": LISTING_SHARDS}, batch_size=1,
            batch_format="numpy")
        if self.meta_columns is not None:
            keep = [c for c in _META_KEEP if c in self.meta_columns]
            meta = ray.data.read_csv(
                str(self.root / "metadata.csv"),
                convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in self.meta_columns},
                                                    include_columns=keep),
            )  # rows without a file_name match no file
            files = files.join(meta, "left_outer", num_partitions=LISTING_SHARDS, on=("_rel",),
                               right_on=("file_name",))
        items = files.map_batches(to_items, fn_kwargs={"spec": self.spec}, batch_format="pyarrow")
        return items.limit(limit) if limit else items
