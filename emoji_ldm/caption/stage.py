"""`emoji-ldm dataset caption`: caption a dataset in Ray Data, one new version per pass.

    emoji-ldm dataset caption URI [--captioner metadata|qwen2.5-vl|vllm] [--model ID] [--template FILE]
                                  [--batch-size B] [--concurrency N] [--num-gpus G] [--only-missing]

Design: one pass = one Delta commit that rewrites only the data files holding
rows it captioned, with per-task progress files for resume. Why this one:
- a MERGE per chunk (the first version) scans and rewrites the whole table
  each time, N^2/chunk in all, and made 26 versions for 40,000 rows;
- one MERGE per pass runs its join on the driver (delta-rs, one process),
  whose memory grows with the captions;
- a separate caption table joined at read time would change every reader
  (encode, show, train);
- rewriting the touched files in Ray tasks is O(rows touched), runs on the
  whole cluster, and `store.delta.CommitDeltaDatasink.commit` (`deltalake`'s
  public `create_write_transaction`) commits their removes and adds atomically.

Phases (all in Ray Data; the driver holds only the table's file list):
  1. the files to touch come from the Delta log (every file, or with
     `--only-missing` those whose `caption` null count is not zero);
  2. their rows stream (`read_parquet(include_paths=True)`) through the
     captioner (tasks for `metadata`, an actor pool with one model per actor
     for `qwen2.5-vl`, vLLM engines for `vllm`); results (id, caption, error)
     are staged as Parquet under `_emoji_ldm/caption-runs/<run>/<file>/`, one
     folder per source file. These are the progress files: a killed pass
     re-run with the same options skips every staged row (a left anti-join);
  3. one task per touched file rewrites it with its staged captions, and
     writes the rows that failed to `_emoji_ldm/caption-failures/<run>/`;
  4. the driver commits every removed and added file in one transaction,
     from the version it read (a concurrent append stays; a conflicting
     commit fails the pass, which then re-runs from the new version).
Rows that fail keep no caption.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.runtime.connect import ensure_ray
from emoji_ldm.runtime.partitions import shuffle_partitions
from emoji_ldm.runtime.shared import require_shared
from emoji_ldm.store.delta import CommitDeltaDatasink, version_for_build
from emoji_ldm.store.schema import value_counts
from emoji_ldm.store.sidecar import SIDECAR
from emoji_ldm.store.staging import FileStagingSink, folder_dataset, has_staged, read_folder
from emoji_ldm.store.uri import filesystem, is_s3, join
from emoji_ldm.version import code_version

CAPTIONERS = ("metadata", "qwen2.5-vl", "vllm")


@dataclass(frozen=True)
class CaptionConfig:
    dataset: str = opt(positional=True, metavar="uri", help="dataset URI (its latest version is captioned)")
    captioner: str = opt("metadata", help="metadata (no model) | qwen2.5-vl | vllm")
    model: str | None = opt(None, help="qwen2.5-vl/vllm: hub id or local folder "
                                       "(default Qwen/Qwen2.5-VL-3B-Instruct)")
    template: str | None = opt(None, help="a file with your own instruction; must contain {title}")
    batch_size: int = opt(16, help="rows per model call")
    concurrency: int = opt(1, help="model actors / vLLM engines")
    num_gpus: float = opt(0.0, help="GPUs per model actor; > 0 runs bf16")
    only_missing: bool = opt(False, help="caption only rows without a caption (resume)")
    max_new_tokens: int = opt(128, help="caption length cap in tokens")
    limit: int | None = opt(None, help="caption at most N rows")
    message: str = opt("", help="a note recorded with the new version")

    def __post_init__(self):
        if self.captioner not in CAPTIONERS:
            raise UserError(f"unknown captioner {self.captioner!r}: use one of {', '.join(CAPTIONERS)}")
        for name in ("batch_size", "concurrency", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_gpus < 0:
            raise UserError(f"--num-gpus must be >= 0, got {self.num_gpus}")
        if self.captioner == "metadata" and (self.model or self.template):
            raise UserError("the metadata captioner uses no model and no template: drop --model/--template")


def _model_source(config: CaptionConfig) -> str:
    """A local folder (checked now) or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct."""
    from emoji_ldm.caption.qwen import DEFAULT_MODEL

    model = config.model or DEFAULT_MODEL
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.abspath(os.path.expanduser(model))  # actors may run elsewhere: no relative paths
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        return model  # a hub id: the actors download it (or find it in the HF cache)
    raise UserError(f"--model {model!r} is not a folder: give a local model folder or a hub id "
                    "like Qwen/Qwen2.5-VL-3B-Instruct")


def caption_dataset(config: CaptionConfig) -> dict:
    """Caption rows of the dataset's latest version into one new version; returns a summary."""
    from emoji_ldm.caption.prompt import load_template, prompt_id
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.uri import DatasetRef, normalize_uri

    start = time.perf_counter()
    ref = DatasetRef.parse(config.dataset)
    if ref.version is not None or ref.tag is not None:
        raise UserError(f"caption writes a new version of {ref.uri!r}: give the dataset URI without @version/@tag")
    uri = normalize_uri(ref.uri)
    table = open_table(uri)  # a clear error for a missing table
    template = load_template(config.template) if config.captioner != "metadata" else None
    pid = prompt_id(template) if template else "metadata-v1"
    model = _model_source(config) if config.captioner != "metadata" else None
    caption_model = model or "metadata"

    version = table.version()
    files = _data_files(table)
    rows, missing = int(pc.sum(files.column("rows")).as_py() or 0), int(pc.sum(files.column("missing")).as_py() or 0)
    if config.only_missing:
        files = files.filter(pc.greater(files.column("missing"), 0))
    todo = missing if config.only_missing else rows
    todo = min(todo, config.limit) if config.limit else todo
    print(f"caption: {uri}@{version}: {rows} rows, {missing} without a caption; captioning "
          f"{todo} with {config.captioner}" + (f" ({caption_model}, prompt {pid})" if model else ""), flush=True)
    summary = {"uri": uri, "from_version": version, "rows": rows, "todo": todo, "captioned": 0,
               "failed": Counter(), "versions": [], "seconds": 0.0}
    if not todo:
        return summary

    ensure_ray()
    require_shared(uri, "the dataset")
    key = _run_key(uri, version, config, caption_model, pid)
    run = join(uri, SIDECAR, "caption-runs", key)
    summary["staged_now"] = _stage_captions(uri, files, run, config, model, template)
    print(f"caption: {summary['staged_now']} rows captioned or failed in this run, staged under {run}", flush=True)

    metadata = {"operation": "caption", "source": f"{uri}@{version}", "captioner": config.captioner,
                "caption_model": caption_model, "caption_prompt_id": pid, "build_id": key,
                "config": dataclasses.asdict(config), "code_version": code_version(),
                "message": config.message or f"caption with {config.captioner}"}
    sink = CaptionRewriteSink(uri, metadata=metadata, read_version=version, caption_model=caption_model,
                              prompt_id=pid, failures=join(uri, SIDECAR, "caption-failures", key))
    folders = folder_dataset(run, files.column("path"))  # a file with nothing staged is read as empty and kept
    if folders is not None and (summary["staged_now"] or has_staged(run)):
        folders.write_datasink(sink)
    summary["captioned"], summary["failed"] = sink.captioned, sink.failed
    if sink.version is not None:
        summary["versions"].append(sink.version)
    if sum(sink.failed.values()):
        summary["failures_uri"] = sink.failures
    summary["seconds"] = time.perf_counter() - start
    if not summary["captioned"]:  # a pass that captions nothing is a failure, not a success with 0 rows
        reasons = ", ".join(f"{k} {v}" for k, v in sink.failed.items()) or "no rows reached the captioner"
        raise UserError(f"caption: none of the {todo} rows got a caption ({reasons}); the table stays at version "
                        f"{version}" + (f"; reasons per row in {sink.failures}" if sum(sink.failed.values()) else ""))
    return summary


def report(summary: dict) -> str:
    if not summary["todo"]:
        return "caption: nothing to do"
    reasons = ", ".join(f"{k} {v}" for k, v in summary["failed"].items()) or "none"
    seconds = max(summary["seconds"], 1e-9)
    text = (f"caption: {summary['captioned']} captioned, {sum(summary['failed'].values())} failed ({reasons}) in "
            f"{summary['seconds']:.1f} s ({summary['captioned'] / seconds:.1f} rows/s); latest version "
            f"{summary['versions'][-1] if summary['versions'] else summary['from_version']}")
    if summary.get("failures_uri"):
        text += f"\ncaption: failure reasons per row: {summary['failures_uri']}"
    return text


def _run_captioner(ds, config: CaptionConfig, model: str | None, template: str | None):
    import ray.data

    if config.captioner == "metadata":
        from emoji_ldm.caption.metadata import caption_batch

        return ds.map_batches(caption_batch, batch_size=max(config.batch_size, 256), batch_format="numpy")
    if config.captioner == "qwen2.5-vl":
        from emoji_ldm.caption.qwen import QwenCaptioner

        return ds.map_batches(
            QwenCaptioner,
            fn_constructor_kwargs={"model": model, "template": template, "max_new_tokens": config.max_new_tokens,
                                   "device": "cuda" if config.num_gpus > 0 else "cpu"},
            batch_size=config.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_gpus=config.num_gpus,
        )
    from emoji_ldm.caption.vllm import vllm_caption

    return vllm_caption(ds, model, template, config.max_new_tokens, config.concurrency, config.batch_size)


def _data_files(table) -> pa.Table:
    """The table's data files at its loaded version (from the log): path, rows, rows without a caption, bytes."""
    from emoji_ldm.store.log import file_actions

    actions = file_actions(table)
    rows = pc.fill_null(actions.column("num_records"), 0)
    if "null_count.caption" in actions.column_names:  # writers that kept no column stats: assume all missing
        missing = pc.coalesce(actions.column("null_count.caption"), rows)
    else:
        missing = rows
    return pa.table({"path": actions.column("path"), "rows": rows, "missing": pc.cast(missing, pa.int64()),
                     "bytes": pc.fill_null(actions.column("size_bytes"), 0)})


def _run_key(uri: str, version: int, config: CaptionConfig, caption_model: str, pid: str) -> str:
    """Runs with the same table version and options share their staged progress."""
    import hashlib
    import json

    what = {"uri": uri, "version": version, "captioner": config.captioner, "model": caption_model, "prompt": pid,
            "only_missing": config.only_missing, "limit": config.limit, "max_new_tokens": config.max_new_tokens}
    return f"v{version}-" + hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _stage_captions(uri: str, files: pa.Table, run: str, config: CaptionConfig, model, template) -> int:
    """Phase 2: caption the rows to do, staging (id, caption, error) per source file; returns rows staged."""
    fs, root = filesystem(uri)
    paths = [f"{root.rstrip('/')}/{p}" for p in files.column("path").to_pylist()]
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True).select_columns(
        ["id", "image", "title", "tag", "source", "caption", "path"])
    ds = ds.map_batches(_todo_rows, fn_kwargs={"root": root.rstrip("/") + "/", "only_missing": config.only_missing},
                        batch_format="pyarrow")
    staged = _staged_ids(run)
    if staged is not None:
        # the rows to do carry their images through the join: partitions by the files' bytes
        size = int(pc.sum(files.column("bytes")).as_py() or 0)
        ds = ds.join(staged, "left_anti", num_partitions=shuffle_partitions(size), on=("id",))
    if config.limit:
        ds = ds.limit(config.limit)
    ds = _run_captioner(ds, config, model, template)
    sink = FileStagingSink(run, STAGED_SCHEMA)
    ds.write_datasink(sink)
    return sink.rows


def _todo_rows(batch: pa.Table, root: str, only_missing: bool) -> pa.Table:
    """Ray Data task: rows read with their file path -> the rows to caption, with `_file` relative to the table."""
    if only_missing:
        batch = batch.filter(pc.is_null(batch.column("caption")))
    files = pc.replace_substring_regex(batch.column("path"), f"^{re.escape(root)}", "")
    return pa.table({"id": batch.column("id"), "image": batch.column("image"), "title": batch.column("title"),
                     "tag": batch.column("tag"), "source": batch.column("source"), "_file": files})


STAGED_SCHEMA = pa.schema([("id", pa.string()), ("caption", pa.string()), ("error", pa.string()),
                           ("_file", pa.string())])


def _staged_ids(run: str):
    """A Ray Dataset of the ids a killed run already staged, or None."""
    if not has_staged(run):
        return None
    fs, path = filesystem(run)
    return ray.data.read_parquet(path, filesystem=fs).select_columns(["id"])


class CaptionRewriteSink(CommitDeltaDatasink):
    """Phase 3 and 4: each write task rewrites the source files of its staged folders with their
    captions; the driver commits every removal and addition in one transaction."""

    def __init__(self, uri: str, *, metadata: dict, read_version: int, caption_model: str, prompt_id: str,
                 failures: str):
        from emoji_ldm.store.schema import EMOJI_SCHEMA

        super().__init__(uri, schema=EMOJI_SCHEMA, metadata=metadata)
        self.read_version, self.caption_model, self.prompt_id = read_version, caption_model, prompt_id
        self.failures = failures
        self.captioned, self.failed = 0, Counter()
        self.version: int | None = None

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        out = {"adds": [], "removes": [], "captioned": 0, "failed": {}}
        for block in blocks:
            for folder in BlockAccessor.for_block(block).to_arrow().column("folder").to_pylist():
                self._rewrite(folder, out)
        return out

    def _rewrite(self, folder: str, out: dict) -> None:
        import pyarrow.parquet as pq

        staged = read_folder(folder, STAGED_SCHEMA)
        if staged.num_rows == 0:
            return
        file = staged.column("_file")[0].as_py()  # a staged folder holds the rows of one source file
        ok = staged.filter(pc.is_valid(staged.column("caption")))
        bad = staged.filter(pc.is_null(staged.column("caption")))
        reasons = pc.fill_null(bad.column("error"), "empty generation")
        if bad.num_rows:  # counted by kind (the text before the first ':') in Arrow, not row by row
            kinds = value_counts(pc.list_element(pc.split_pattern(reasons, ":", max_splits=1), 0))
            for kind, n in kinds.items():
                out["failed"][kind] = out["failed"].get(kind, 0) + n
            self._write_failures(pa.table({"id": bad.column("id"), "reason": reasons}))
        if ok.num_rows == 0:
            return  # nothing to change in this file
        source = f"{self.root.rstrip('/')}/{file}"
        size = self.fs.get_file_info(source).size
        with self.fs.open_input_file(source) as f:
            reader = pq.ParquetFile(f)
            actions = super().write(self._captioned(reader, ok), None)
        out["adds"] += actions
        out["removes"].append({"path": file, "size": size})  # RemoveActions do not pickle: the commit makes them
        out["captioned"] += ok.num_rows

    def _captioned(self, reader, ok: pa.Table):
        """The file's rows, batch by batch, with the staged captions applied (by id)."""
        for batch in reader.iter_batches(batch_size=1024):
            rows = pa.Table.from_batches([batch])
            where = pc.index_in(rows.column("id"), value_set=ok.column("id"))
            hit = pc.is_valid(where)
            new = pc.take(ok.column("caption"), where)
            n = rows.num_rows
            updates = {
                "caption": pc.if_else(hit, new, rows.column("caption")),
                "caption_model": pc.if_else(hit, pa.array([self.caption_model] * n), rows.column("caption_model")),
                "caption_prompt_id": pc.if_else(hit, pa.array([self.prompt_id] * n),
                                                rows.column("caption_prompt_id")),
            }
            for name, values in updates.items():
                rows = rows.set_column(rows.schema.get_field_index(name), name, values)
            yield rows

    def _write_failures(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        fs, folder = filesystem(self.failures)
        if not is_s3(self.failures):
            fs.create_dir(folder, recursive=True)
        pq.write_table(table, f"{folder.rstrip('/')}/part-{uuid.uuid4().hex}.parquet", filesystem=fs)

    def on_write_complete(self, write_result) -> None:
        adds, removes = [], []
        for r in write_result.write_returns:
            adds += r["adds"]
            removes += r["removes"]
            self.captioned += r["captioned"]
            self.failed.update(r["failed"])
        if not adds:
            return
        self.metadata = {**self.metadata, "counts": {"captioned": self.captioned, "failed": dict(self.failed),
                                                     "files_rewritten": len(removes)}}
        self.commit(adds, removes=removes, read_version=self.read_version)
        self.version = version_for_build(self.uri, self.metadata["build_id"])
