"""The prompt file of `emoji-ldm bulk`: .txt (one prompt per line, # comments), or .csv/.parquet with a
`prompt` column, local or S3. Checked from its head on the driver, then read by Ray Data into its distinct
prompts, each with a content id."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from emoji_ldm.errors import UserError
from emoji_ldm.runtime.partitions import shuffle_partitions


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


PROMPT_FORMATS = (".txt", ".csv", ".parquet")
HEAD_ROWS = 10_000


def check_prompts(uri: str) -> str | None:
    """Check the prompt file on the driver from its head; returns the CSV/Parquet `prompt` column name."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from emoji_ldm.store.uri import filesystem

    name = uri.lower()
    if not name.endswith(PROMPT_FORMATS):
        raise UserError(f"--prompts {uri!r}: use a .txt (one prompt per line), .csv or .parquet file")
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type.name != "File":
        raise UserError(f"--prompts {uri!r} does not exist")
    try:
        if name.endswith(".txt"):
            with fs.open_input_stream(path) as f:
                for n, line in enumerate(f.read(4 << 20).decode("utf-8", errors="replace").splitlines()):
                    if line.strip() and not line.lstrip().startswith("#"):
                        return None
                    if n > HEAD_ROWS:
                        break
            raise UserError(f"--prompts {uri!r} has no prompts")
        if name.endswith(".csv"):
            with fs.open_input_stream(path) as f:
                head = pa.Table.from_batches([pcsv.open_csv(f).read_next_batch()])
        else:
            with fs.open_input_file(path) as f:
                first = next(pq.ParquetFile(f).iter_batches(batch_size=HEAD_ROWS), None)
                head = pa.Table.from_batches([first]) if first is not None else pa.table({"prompt": []})
    except StopIteration:
        raise UserError(f"--prompts {uri!r} has no prompts") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"--prompts {uri!r} cannot be read: {e}") from None
    if "prompt" not in head.column_names:
        raise UserError(f"--prompts {uri!r} has no `prompt` column (columns: {', '.join(head.column_names)})")
    if not any(p and str(p).strip() for p in head.column("prompt").to_pylist()):
        raise UserError(f"--prompts {uri!r} has no prompts")
    return "prompt"


def _prompt_rows(batch: pa.Table, column: str) -> pa.Table:
    """Ray Data task: lines or rows -> (prompt_id, prompt), whitespace normalised, blanks and # comments dropped."""
    prompts = []
    for p in batch.column(column).to_pylist():
        p = " ".join(str(p or "").split())
        if p and not (column == "text" and p.startswith("#")):
            prompts.append(p)
    return pa.table({"prompt_id": [prompt_id(p) for p in prompts], "prompt": prompts},
                    schema=pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())]))


def prompt_dataset(uri: str):
    """The distinct prompts of a prompt file, as a Ray Dataset of (prompt_id, prompt)."""
    import ray.data

    from emoji_ldm.store.uri import filesystem

    check_prompts(uri)
    fs, path = filesystem(uri)
    name = uri.lower()
    if name.endswith(".txt"):
        ds, column = ray.data.read_text(path, filesystem=fs), "text"
    elif name.endswith(".csv"):
        ds, column = ray.data.read_csv(path, filesystem=fs), "prompt"
    else:
        ds, column = ray.data.read_parquet(path, filesystem=fs).select_columns(["prompt"]), "prompt"
    rows = ds.map_batches(_prompt_rows, fn_kwargs={"column": column}, batch_format="pyarrow")
    return rows.groupby("prompt_id", num_partitions=prompt_partitions(uri)).map_groups(
        lambda g: g.slice(0, 1), batch_format="pyarrow")


def prompt_partitions(uri: str) -> int:
    """Shuffle partitions for the prompts of a prompt file (its size on storage x 4: the rows gain a 64-character
    prompt id, and a Parquet file is compressed): they grow with the file, not each task's memory."""
    from emoji_ldm.store.uri import filesystem

    fs, path = filesystem(uri)
    return shuffle_partitions(4 * (fs.get_file_info(path).size or 0))
