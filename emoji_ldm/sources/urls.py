"""`urls:FILE`: a list of image URLs in .txt, .csv or .parquet.

- `.txt`: one URL per line; blank lines and `#` comments are skipped.
- `.csv` / `.parquet`: a `url` (or `image_url`) column, optional `title`
  (or `image_title`), `tag` and `caption` (or `prompt`) columns.
Every URL must be http(s); the first bad one is named with its line/row.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from emoji_ldm.errors import UserError
from emoji_ldm.sources.base import SourceItem

_ALIASES = {"url": ("url", "image_url"), "title": ("title", "image_title"), "caption": ("caption", "prompt")}


def _check_url(url: str, where: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"{where}: {url!r} is not an http(s) URL; fix or remove that line")
    return url


def _pick(columns, name: str) -> str | None:
    return next((c for c in _ALIASES.get(name, (name,)) if c in columns), None)


def url_items(file: str) -> list[SourceItem]:
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"urls:{file}: {path} is not a readable file")
    spec = f"urls:{path.resolve()}"
    suffix = path.suffix.lower()
    items: list[SourceItem] = []
    if suffix in (".txt", ".list", ""):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"urls:{file} is not UTF-8 text") from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                items.append(SourceItem(locator=_check_url(line, f"{path}:{n}"), source=spec))
    elif suffix in (".csv", ".parquet"):
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(path)
        except Exception as e:  # pandas raises many parser error types
            raise UserError(f"urls:{file} cannot be read as {suffix[1:]}: {e}") from None
        url_col = _pick(df.columns, "url")
        if url_col is None:
            raise UserError(f"urls:{file} has no 'url' or 'image_url' column (columns: {list(df.columns)})")
        title_col, tag_col, cap_col = _pick(df.columns, "title"), _pick(df.columns, "tag"), _pick(df.columns, "caption")
        for n, row in enumerate(df.to_dict("records"), 2 if suffix == ".csv" else 0):
            url = _check_url(str(row[url_col] or ""), f"{path} row {n}")
            items.append(
                SourceItem(
                    locator=url,
                    source=spec,
                    title=str(row[title_col] or "") if title_col else "",
                    tag=str(row[tag_col] or "") if tag_col else "",
                    caption=(str(row[cap_col]) or None) if cap_col else None,
                )
            )
    else:
        raise UserError(f"urls:{file}: unknown list format {suffix!r}; use .txt, .csv or .parquet")
    if not items:
        raise UserError(f"urls:{file} lists no URLs")
    return items
