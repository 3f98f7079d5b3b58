"""`dir:PATH`: a folder of images, optionally with the seed's `metadata.csv`.

`metadata.csv` columns: `file_name`, `image_url`, `image_title`, `tag` and an
optional `prompt` (kept as the caption). Files it does not name are still
ingested, titled by their file name. Every regular file except hidden ones and
`metadata.csv` is an input: non-images are rejected with a reason at ingest.
"""

from __future__ import annotations

import csv
from pathlib import Path

from emoji_ldm.errors import UserError
from emoji_ldm.sources.base import SourceItem

METADATA_COLUMNS = ("file_name", "image_url", "image_title", "tag")


def _read_metadata(path: Path) -> dict[str, dict]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in ("file_name",) if c not in columns]
            if missing:
                raise UserError(
                    f"{path} has no {missing[0]!r} column (columns: {columns}); "
                    f"expected {', '.join(METADATA_COLUMNS)} and optional prompt"
                )
            return {row["file_name"]: row for row in reader if row.get("file_name")}
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save metadata.csv as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path} is not valid CSV: {e}") from None


def dir_items(folder: str) -> list[SourceItem]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"dir:{folder}: {root} is not a folder; give dir:PATH with PATH a folder of images")
    meta_path = root / "metadata.csv"
    meta = _read_metadata(meta_path) if meta_path.exists() else {}
    spec = f"dir:{root.resolve()}"
    items = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if f == meta_path or any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        row = meta.get(rel) or meta.get(f.name) or {}
        items.append(
            SourceItem(
                locator=str(f.resolve()),
                source=spec,
                title=row.get("image_title") or f.stem.replace("_", " ").replace("-", " "),
                tag=row.get("tag") or "",
                caption=row.get("prompt") or None,
                source_url=row.get("image_url") or str(f.resolve()),
            )
        )
    if not items:
        raise UserError(f"dir:{folder} holds no files to ingest")
    return items
