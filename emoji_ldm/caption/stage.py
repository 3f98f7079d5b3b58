"""`emoji-ldm dataset caption`: caption a dataset in Ray Data, one new version per chunk of rows.

    emoji-ldm dataset caption URI [--captioner metadata|qwen2.5-vl|vllm] [--model ID] [--template FILE]
                                  [--batch-size B] [--concurrency N] [--num-gpus G] [--only-missing]

The rows to caption stream through the captioner (tasks for `metadata`, an
actor pool with one model per actor for `qwen2.5-vl`, vLLM engines for `vllm`);
every `chunk_size` results are merged into the table by `id` in one Delta
commit. A killed job keeps its finished chunks; `--only-missing` then captions
just the rows still without a caption, so a re-run continues instead of
starting over. Rows that fail keep no caption, and their reasons go to
`_emoji_ldm/caption-failures/<run>.parquet`.
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

from emoji_ldm.errors import UserError
from emoji_ldm.options import opt

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
    chunk_size: int = opt(2048, help="rows per committed version")
    max_new_tokens: int = opt(128, help="caption length cap in tokens")
    limit: int | None = opt(None, help="caption at most N rows")
    message: str = opt("", help="a note recorded with the new version(s)")

    def __post_init__(self):
        if self.captioner not in CAPTIONERS:
            raise UserError(f"unknown captioner {self.captioner!r}: use one of {', '.join(CAPTIONERS)}")
        for name in ("batch_size", "concurrency", "chunk_size", "max_new_tokens"):
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
    """Caption rows of the dataset's latest version into new versions; returns a summary."""
    from emoji_ldm.caption.prompt import load_template, prompt_id
    from emoji_ldm.runtime import ensure_ray
    from emoji_ldm.store.delta import open_table, read_dataset
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
    meta = table.to_pyarrow_table(columns=["id", "caption"])
    missing = [i for i, c in zip(meta.column("id").to_pylist(), meta.column("caption").to_pylist()) if not c]
    todo = set(missing if config.only_missing else meta.column("id").to_pylist())
    if config.limit:
        todo = set(sorted(todo)[: config.limit])
    print(f"caption: {uri}@{version}: {meta.num_rows} rows, {len(missing)} without a caption; captioning "
          f"{len(todo)} with {config.captioner}" + (f" ({caption_model}, prompt {pid})" if model else ""), flush=True)
    summary = {"uri": uri, "from_version": version, "rows": meta.num_rows, "todo": len(todo), "captioned": 0,
               "failed": Counter(), "versions": [], "seconds": 0.0}
    if not todo:
        return summary

    ensure_ray()
    ds, _ = read_dataset(DatasetRef(uri, version=version), columns=["id", "image", "title", "tag"])
    ds = ds.filter(lambda row, todo=frozenset(todo): row["id"] in todo)
    ds = _run_captioner(ds, config, model, template)

    run_id = uuid.uuid4().hex[:12]
    failures: list[dict] = []
    for n, chunk in enumerate(ds.iter_batches(batch_size=config.chunk_size, batch_format="pyarrow"), 1):
        rows = chunk.to_pylist()
        ok = [r for r in rows if r["caption"]]
        bad = [r for r in rows if not r["caption"]]
        failures += [{"id": r["id"], "reason": r["error"] or "empty generation"} for r in bad]
        summary["failed"].update((r["error"] or "empty generation").split(":")[0] for r in bad)
        if ok:
            new_version = _merge_captions(uri, ok, caption_model, pid, {
                "operation": "caption", "source": f"{uri}@{version}", "captioner": config.captioner,
                "caption_model": caption_model, "caption_prompt_id": pid, "build_id": f"{run_id}-{n}",
                "counts": {"captioned": len(ok), "failed": len(bad)}, "config": dataclasses.asdict(config),
                "message": config.message or f"caption chunk {n} with {config.captioner}",
            })
            summary["versions"].append(new_version)
        summary["captioned"] += len(ok)
        print(f"caption: chunk {n}: {len(ok)} captioned, {len(bad)} failed"
              + (f" -> version {summary['versions'][-1]}" if ok else ""), flush=True)

    if failures:
        from emoji_ldm.store.delta import write_sidecar_parquet

        summary["failures_uri"] = write_sidecar_parquet(uri, f"caption-failures/{run_id}.parquet",
                                                        pa.Table.from_pylist(failures))
    summary["seconds"] = time.perf_counter() - start
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


def _merge_captions(uri: str, rows: list[dict], caption_model: str, pid: str, metadata: dict) -> int:
    """Update caption columns of the rows with these ids in one Delta commit; returns the new version."""
    from deltalake import DeltaTable
    from deltalake.transaction import CommitProperties

    from emoji_ldm.store.delta import META_KEY
    from emoji_ldm.store.uri import storage_options

    source = pa.table({
        "id": [r["id"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "caption_model": [caption_model] * len(rows),
        "caption_prompt_id": [pid] * len(rows),
    })
    table = DeltaTable(uri, storage_options=storage_options() or None)
    (table.merge(source=source, predicate="t.id = s.id", source_alias="s", target_alias="t",
                 merge_schema=True,  # tables built before caption_prompt_id existed gain the column
                 commit_properties=CommitProperties(custom_metadata={META_KEY: metadata}))
     .when_matched_update(updates={"caption": "s.caption", "caption_model": "s.caption_model",
                                   "caption_prompt_id": "s.caption_prompt_id"})
     .execute())
    return DeltaTable(uri, storage_options=storage_options() or None).version()
