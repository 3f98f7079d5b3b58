"""`urls:FILE`: a list of image URLs in .txt, .csv or .parquet, on local disk or `s3://`.

- `.txt`: one URL per line; blank lines and `#` comments are skipped.
- `.csv` / `.parquet`: a `url` (or `image_url`) column, optional `title`
  (or `image_title`), `tag` and `caption` (or `prompt`) columns.

The list is read by Ray Data's readers (`read_text`, `read_csv`,
`read_parquet`) in tasks, never whole on the driver. The driver checks the
head of the file (the format, the columns and the first `HEAD_ROWS` rows,
naming the first bad URL with its line or row); a bad URL further down is
rejected at ingest with the reason `bad_url` and counted.
"""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.errors import UserError

_ALIASES = {"url": ("url", "image_url"), "title": ("title", "image_title"), "caption": ("caption", "prompt")}
HEAD_ROWS = 10_000
FORMATS = (".txt", ".list", ".csv", ".parquet")


def is_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _check_url(url: str, where: str) -> str:
    url = url.strip()
    if not is_url(url):
        raise UserError(f"{where}: {url!r} is not an http(s) URL; fix or remove that line")
    return url


def _pick(columns, name: str) -> str | None:
    return next((c for c in _ALIASES.get(name, (name,)) if c in columns), None)


def _suffix(file: str) -> str:
    name = file.rsplit("/", 1)[-1].lower()
    return "." + name.rsplit(".", 1)[1] if "." in name else ""


def text_to_items(batch: pa.Table, spec: str) -> pa.Table:
    """Ray Data task: `read_text` lines -> item rows (blank lines and # comments dropped)."""
    from emoji_ldm.sources.base import ITEM_SCHEMA

    lines = [line.strip() for line in batch.column("text").to_pylist()]
    urls = [line for line in lines if line and not line.startswith("#")]
    n = len(urls)
    return pa.table({"locator": urls, "source": [spec] * n, "source_url": urls, "page_url": [None] * n,
                     "title": [""] * n, "tag": [""] * n, "caption": [None] * n}, schema=ITEM_SCHEMA)


def table_to_items(batch: pa.Table, spec: str, columns: dict[str, str | None]) -> pa.Table:
    """Ray Data task: CSV/Parquet rows -> item rows (column names resolved on the driver)."""
    from emoji_ldm.sources.base import ITEM_SCHEMA

    n = batch.num_rows

    def column(name: str, default: str | None) -> pa.Array:
        source = columns.get(name)
        if source is None:
            return pa.array([default] * n, pa.string())
        values = pc.cast(batch.column(source), pa.string())
        return pc.fill_null(values, default) if default is not None else values

    urls = pc.utf8_trim_whitespace(column("url", ""))
    keep = pc.not_equal(urls, "")
    caption = column("caption", None)
    caption = pc.if_else(pc.equal(caption, ""), pa.nulls(n, pa.string()), caption)
    table = pa.table({"locator": urls, "source": pa.array([spec] * n, pa.string()), "source_url": urls,
                      "page_url": pa.nulls(n, pa.string()), "title": column("title", ""),
                      "tag": column("tag", ""), "caption": caption}, schema=ITEM_SCHEMA)
    return table.filter(keep)


class UrlListSource:
    def __init__(self, file: str):
        from emoji_ldm.store.uri import filesystem, is_s3, normalize_uri

        self.uri = normalize_uri(file) if is_s3(file) else str(Path(file).expanduser().resolve())
        self.fs, self.path = filesystem(self.uri)
        self.spec = f"urls:{self.uri}"
        self.local_path = None if is_s3(self.uri) else self.uri
        self.suffix = _suffix(file) or ".txt"
        if self.suffix not in FORMATS:
            raise UserError(f"urls:{file}: unknown list format {self.suffix!r}; use .txt, .csv or .parquet")
        try:
            info = self.fs.get_file_info(self.path)
        except OSError as e:
            raise UserError(f"urls:{file}: cannot read it: {e}") from None
        if info.type.name != "File":
            raise UserError(f"urls:{file}: {self.uri} is not a readable file")
        self.file = file
        self.columns: dict[str, str | None] = {}
        if self.suffix in (".txt", ".list"):
            self._check_text_head()
        else:
            self._check_table_head()

    def _check_text_head(self) -> None:
        found = 0
        with self.fs.open_input_stream(self.path) as f:
            reader = io.TextIOWrapper(f, encoding="utf-8")
            try:
                for n, line in enumerate(reader, 1):
                    line = line.strip()
                    if line and not line.startswith("#"):
                        _check_url(line, f"{self.uri}:{n}")
                        found += 1
                    if n >= HEAD_ROWS and found:
                        break
            except UnicodeDecodeError:
                raise UserError(f"urls:{self.file} is not UTF-8 text") from None
        if not found:
            raise UserError(f"urls:{self.file} lists no URLs")

    def _head_table(self) -> pa.Table:
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        try:
            if self.suffix == ".csv":
                with self.fs.open_input_stream(self.path) as f:
                    reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=1 << 20))
                    batch = reader.read_next_batch()
                    return pa.Table.from_batches([batch]).slice(0, HEAD_ROWS)
            with self.fs.open_input_file(self.path) as f:
                pf = pq.ParquetFile(f)
                first = next(pf.iter_batches(batch_size=HEAD_ROWS), None)
                return pa.Table.from_batches([first]) if first is not None else pf.schema_arrow.empty_table()
        except StopIteration:
            return pa.table({})
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"urls:{self.file} cannot be read as {self.suffix[1:]}: {e}") from None

    def _check_table_head(self) -> None:
        head = self._head_table()
        url_col = _pick(head.column_names, "url")
        if url_col is None:
            raise UserError(f"urls:{self.file} has no 'url' or 'image_url' column (columns: {head.column_names})")
        self.columns = {"url": url_col, "title": _pick(head.column_names, "title"),
                        "tag": _pick(head.column_names, "tag"), "caption": _pick(head.column_names, "caption")}
        urls = [str(u or "").strip() for u in head.column(url_col).to_pylist()]
        first_row = 2 if self.suffix == ".csv" else 0
        for n, url in enumerate(urls, first_row):
            if url:
                _check_url(url, f"{self.uri} row {n}")
        if not any(urls):
            raise UserError(f"urls:{self.file} lists no URLs")

    def dataset(self, limit: int | None = None):
        import pyarrow.csv as pcsv
        import ray.data

        if self.suffix in (".txt", ".list"):
            ds = ray.data.read_text(self.path, filesystem=self.fs).map_batches(
                text_to_items, fn_kwargs={"spec": self.spec}, batch_format="pyarrow")
        else:
            if self.suffix == ".csv":
                ds = ray.data.read_csv(self.path, filesystem=self.fs, convert_options=pcsv.ConvertOptions(
                    column_types={c: pa.string() for c in self.columns.values() if c}))
            else:
                ds = ray.data.read_parquet(self.path, filesystem=self.fs).select_columns(
                    [c for c in self.columns.values() if c])
            ds = ds.map_batches(table_to_items, fn_kwargs={"spec": self.spec, "columns": self.columns},
                                batch_format="pyarrow")
        return ds.limit(limit) if limit else ds
