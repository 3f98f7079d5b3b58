"""Encode stage: frozen VAE + text encoder run once in Ray Data, to a latent table.

Input: a dataset version (`URI[@v]`) and a preset (+ `--vae URI` for `tiny`).
Output: a new version of the latent Delta table at `--out`, partitioned by
`split` (train/val, 10% held out by content hash); its layout is described in
`emoji_ldm.store.latents`. The commit records the dataset URI + version and
the encoder ids.

    emoji-ldm encode --dataset URI[@v] --preset tiny [--vae URI] --out URI
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.inference.prompts import FORMS, caption_forms, caption_style
from emoji_ldm.models.presets import Preset, PresetOptions, preset_from_dict, saved_section
from emoji_ldm.store.latents import LATENT_SCHEMA, PARTITION

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeConfig(PresetOptions):
    dataset: str = opt(help="URI, URI@VERSION or URI@TAG")
    out: str = opt(help="latent table URI (a new version per encode)")
    vae: str | None = opt(None, help="a trained VAE folder/URI (tiny); without it tiny trains one first")
    batch_size: int = opt(64, help="rows per encoder call")
    # one model copy per actor, one CPU or GPU each: leave CPUs for the read tasks
    concurrency: int = opt(1, help="encoder actors")
    vae_workers: int = opt(2, help="Ray Train workers when encode trains the VAE itself")
    vae_steps: int | None = opt(None, help="steps when encode trains the VAE itself")
    full: bool = opt(False, help="re-encode every row (default: only rows new or changed since the latent "
                                 "table's dataset version, and remove the rows that are gone)")

    def __post_init__(self):
        if self.batch_size <= 0 or self.concurrency <= 0:
            raise UserError(f"batch_size and concurrency must be positive, got {self.batch_size}, {self.concurrency}")
        if self.vae and self.preset_config().vae.kind == "patches":
            raise UserError(f"--vae {self.vae!r}: preset {self.preset!r} draws pixels (vae.kind=patches) and has no "
                            "VAE to load; leave --vae out")


class Encoder:
    """Ray Data actor: one VAE + text encoder per actor, called on batches of dataset rows."""

    def __init__(self, preset: dict, vae_path: str | None, device: str, caption_style: str = "as-typed"):
        import torch

        from emoji_ldm.models.builders import build_vae, load_text_encoder, vae_scaling_factor
        from emoji_ldm.store.artifacts import local_copy

        self.preset = preset_from_dict(preset)
        self.device = torch.device(device)
        self.vae = build_vae(self.preset, local_copy(vae_path) if vae_path else None).to(self.device).eval()
        self.scale = vae_scaling_factor(self.vae, self.preset)
        self.tokenizer, self.text = load_text_encoder(self.preset)
        self.text.to(self.device)
        self.caption_style = caption_style

    def __call__(self, batch: dict) -> dict:
        import torch

        from emoji_ldm.models.builders import encode_text
        from emoji_ldm.runtime.heap import release_free_heap
        from emoji_ldm.store.splits import split_of
        from emoji_ldm.train.data import decode_images

        size = self.preset.image_size
        pixels = decode_images({"image": batch["image"]}, size, self.vae.config.in_channels,
                               self.preset.vae.key_colour)["pixels"]
        pixels = torch.from_numpy(pixels).float()  # (B, C, H, W), C: the VAE's (4 RGBA, 3 RGB)
        captions = [c if c else (t or "") for c, t in zip(batch["caption"], batch["title"])]
        forms = [form for c in captions for form in caption_forms(c, self.caption_style)]  # B x K, row by row
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.device)).latent_dist.mean * self.scale  # (B, C, h, w)
            emb, _, truncated = encode_text(self.tokenizer, self.text, forms, self.preset.text.max_length)
        if truncated:
            logger.warning("%d caption(s) longer than %d tokens were truncated", truncated,
                           self.preset.text.max_length)
        latents = latents.cpu().numpy().astype(np.float16)  # (B, C, h, w)
        emb = emb.cpu().numpy().astype(np.float16)  # (B * K, L, D)
        if FORMS[self.caption_style] > 1:
            emb = emb.reshape(len(captions), FORMS[self.caption_style], *emb.shape[1:])  # (B, K, L, D)
        release_free_heap()  # the batch's freed activations back to the OS: the actor stays flat
        # Arrow straight from the arrays: no Python object per row here or in the write tasks
        return pa.Table.from_arrays([
            pa.array(batch["id"], pa.string()),
            pa.array(captions, pa.string()),
            pa.array([split_of(i) for i in batch["id"]], pa.string()),
            rows_as_binary(latents),
            _repeat_shape(latents.shape[1:], len(latents)),
            rows_as_binary(emb),
            _repeat_shape(emb.shape[1:], len(emb)),
        ], schema=LATENT_SCHEMA)


def rows_as_binary(x: np.ndarray) -> pa.Array:
    """(B, ...) array -> a binary column of B values, each one row's bytes, sharing the array's memory."""
    flat = np.ascontiguousarray(x).reshape(len(x), math.prod(x.shape[1:])).view(np.uint8)  # (B, bytes per row)
    if flat.size >= 2**31:
        raise ValueError(f"a batch of {flat.size} bytes is over a binary column's 2 GiB: use a smaller batch_size")
    offsets = np.arange(len(x) + 1, dtype=np.int32) * flat.shape[1]  # (B + 1,)
    return pa.Array.from_buffers(pa.binary(), len(x), [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def _repeat_shape(shape: tuple, n: int) -> pa.Array:
    """The list<int32> column of n rows that all have `shape` (not `pa.repeat`: pyarrow 26 refuses 0 rows of a
    list scalar, and an empty batch is a batch)."""
    values = np.tile(np.asarray(shape, dtype=np.int32), n)  # (n * len(shape),)
    offsets = np.arange(n + 1, dtype=np.int32) * len(shape)  # (n + 1,)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def empty_caption_embedding(preset: Preset) -> np.ndarray:
    """The text embedding of "" (caption dropout trains on it), (L, D) float16."""
    from emoji_ldm.models.builders import encode_text, load_text_encoder

    tokenizer, model = load_text_encoder(preset)
    emb, _, _ = encode_text(tokenizer, model, [""], preset.text.max_length)
    return emb[0].numpy().astype(np.float16)


LATENT_FILE_BYTES = 64 * 2**20
# The (id, caption) keys one removal commit holds in the driver (a Delta MERGE): about 100 MB at a million
DELETE_KEYS_PER_COMMIT = 1_000_000
CAPTION_STYLE_ROWS = 512  # captions read to tell their style: the first rows that have one
MINILM_WIDTH = 384  # text.hidden_size None: the embedded MiniLM's


def latent_rows_per_file(preset: Preset) -> int:
    """Rows of one latent data file: about 64 MiB of float16 latents and text embeddings (256 to 20,000), so
    that files, and every task that reads or rewrites one, stay the same size however big the table."""
    latent = preset.vae.latent_channels * preset.latent_size ** 2  # C x h x w
    text = preset.text.max_length * (preset.text.hidden_size or MINILM_WIDTH)  # L x D
    return max(256, min(20_000, LATENT_FILE_BYTES // (2 * (latent + text) + 64)))


def _text_rows(batch: dict) -> dict:
    """The text a row is encoded with: its caption, else its title (the latent table's `caption`)."""
    text = [c if c else (t or "") for c, t in zip(batch["caption"], batch["title"])]
    return {**batch, "caption": np.array(text, dtype=object)}


def _previous_encode(out: str, preset: Preset, vae: str | None, full: bool):
    """The latent table's current version and its encode metadata, when this encode may build on it."""
    from emoji_ldm.store.delta import commit_metadata, open_table, table_exists

    if full or not table_exists(out):
        return None
    table = open_table(out)
    meta = commit_metadata(table)
    if meta.get("operation") != "encode":
        raise UserError(f"{out!r} is a Delta table but not a latent table: choose another --out")

    def key(d):  # as JSON, each section as it is written today (the commit stored tuples as lists)
        return json.dumps({k: saved_section(k, d[k]) if k in d else None for k in ("image_size", "vae", "text")},
                          sort_keys=True)

    if key(meta.get("preset", {})) != key(preset.to_dict()) or (vae and meta.get("vae") != vae):
        raise UserError(f"the latent table {out!r} was encoded with another preset, VAE or text encoder "
                        f"({meta.get('preset', {}).get('name')!r}, VAE {meta.get('vae')!r}): pass --full to "
                        "re-encode every row, or choose another --out")
    return table, meta


def _check_dataset(dataset: str):
    """The dataset's Delta table, checked before Ray starts and without reading the images (clear errors for
    a missing dataset, version or tag; counts from the log, text by Arrow compute, stopping at the first row
    that has some)."""
    from emoji_ldm.store.delta import arrow_dataset, open_table, row_count

    table = open_table(dataset)
    if row_count(table) == 0:
        raise UserError(f"dataset {dataset!r} (version {table.version()}) has no rows to encode")
    has_text = (pc.field("caption") != "") | (pc.field("title") != "")
    if arrow_dataset(table).head(1, columns=["id"], filter=has_text).num_rows == 0:
        raise UserError(f"dataset {dataset!r} has no captions or titles: caption it first")
    return table


def _caption_style(table) -> str:
    """The captions' style (`inference.prompts.caption_style`) from the first rows that have one: what the model
    card's `prompt_style` says, so that typed prompts reach the model in its captions' form. A bounded read."""
    from emoji_ldm.store.delta import arrow_dataset

    head = arrow_dataset(table).head(CAPTION_STYLE_ROWS, columns=["caption"], filter=pc.field("caption") != "")
    return caption_style(head.column("caption").to_pylist())


def _vae_to_use(config: EncodeConfig, preset: Preset, out: str, vae_path: str | None, previous) -> str | None:
    """The VAE folder/URI to encode with: the one the latent table's rows were encoded with, else `--vae`, else
    (a preset that trains its own) one trained now under the table's `_emoji_ldm/`; None: the preset's hub VAE."""
    from emoji_ldm.store.artifacts import artifact_uri

    if previous is not None:
        return previous[1]["vae"]
    if not preset.vae.trained_here or vae_path:
        return vae_path
    from emoji_ldm.train import checkpoint
    from emoji_ldm.train.vae import VAETrainConfig, train_vae

    vae_path = artifact_uri(out, "_emoji_ldm", "vae")
    print(f"[encode] preset {preset.name!r} trains its own VAE and no --vae was given: "
          f"training one first ({config.vae_steps or preset.vae.train_steps} steps) -> {vae_path}", flush=True)
    # a re-run after a killed encode continues the VAE it was training
    train_vae(VAETrainConfig(dataset=config.dataset, out=vae_path, preset=config.preset,
                             overrides=config.overrides, use_gpu=config.use_gpu, workers=config.vae_workers,
                             max_steps=config.vae_steps, resume=checkpoint.latest(vae_path) is not None))
    return vae_path


def _rows_to_encode(ds, out: str, table, previous, preset: Preset, metadata: dict):
    """(write mode, rows to encode, rows removed). A new table, or one whose rows hold another number of caption
    forms (`text_forms`: the captions' style changed, and rows of two shapes cannot be stacked): every row,
    overwritten, with the empty caption's embedding beside it. Else only the rows whose (id, caption) the table
    lacks, after removing the table's rows whose (id, caption) the dataset no longer has; every row, overwritten,
    when those are half the table."""
    from emoji_ldm.runtime.partitions import shuffle_partitions
    from emoji_ldm.store.artifacts import artifact_uri, write_bytes
    from emoji_ldm.store.delta import read_dataset, row_count
    from emoji_ldm.store.log import file_actions
    from emoji_ldm.store.uri import DatasetRef

    if previous is not None and previous[1].get("text_forms", 1) != metadata["text_forms"]:
        print(f"[encode] the latent table {out!r} holds {previous[1].get('text_forms', 1)} caption form(s) a row "
              f"and these captions take {metadata['text_forms']}: encoding every row again", flush=True)
        previous = None
    if previous is None:
        buf = io.BytesIO()
        np.savez(buf, emb=empty_caption_embedding(preset))
        write_bytes(artifact_uri(out, "_emoji_ldm", "empty_caption.npz"), buf.getvalue())
        return "overwrite", ds, 0
    # the rows to do carry their images through the join: partitions by both tables' bytes
    size = sum(int(pc.sum(file_actions(t).column("size_bytes")).as_py() or 0) for t in (table, previous[0]))
    parts = shuffle_partitions(size)
    have, _ = read_dataset(DatasetRef(out, version=previous[0].version()), columns=["id", "caption"])
    keys = ds.select_columns(["id", "caption"])
    # the latent rows whose (id, caption) the dataset no longer has: their keys in the object store (spilled at
    # scale), counted, then removed a bounded chunk at a time
    stale = have.join(keys, "left_anti", parts, on=("id", "caption")).materialize()
    if stale.count() and 2 * stale.count() >= row_count(previous[0]):  # most rows changed: encode them all
        return "overwrite", ds, stale.count()
    removed = _remove_rows(out, stale, {**metadata, "phase": "remove", "message": f"{metadata['message']}: remove"})
    return "append", ds.join(have, "left_anti", parts, on=("id", "caption")), removed


def _encoded(todo, config: EncodeConfig, preset: Preset, vae_path: str | None, style: str):
    """The rows through a pool of encoder actors, in blocks of one latent data file each."""
    import ray.data

    encoded = todo.map_batches(
        Encoder,
        fn_constructor_kwargs={"preset": preset.to_dict(), "vae_path": vae_path,
                               "device": "cuda" if config.use_gpu else "cpu", "caption_style": style},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_gpus=1 if config.use_gpu else 0,
    )
    # the encoder makes blocks as small as its input bundles; strict: combine them too, into files of a
    # steady ~64 MiB
    return encoded.repartition(target_num_rows_per_block=max(latent_rows_per_file(preset), config.batch_size),
                               strict=True)


def encode(config: EncodeConfig) -> dict:
    """Encode a dataset version into the latent table at `out`; returns a summary.

    Incremental unless `full`: only rows whose id or caption is new or changed
    since the dataset version the latent table was built from are encoded
    (a Ray Data left anti-join on (id, caption)), and rows no longer in the
    dataset (or with another caption) are removed: one version per
    `DELETE_KEYS_PER_COMMIT` rows removed, then the append. A run killed between
    them leaves the changed rows missing, and the next run encodes them. When at
    least half the table's rows changed (a re-caption pass), every row is
    encoded again into one overwriting version instead, with no keys to hold.
    """
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.store.artifacts import check_writable
    from emoji_ldm.store.delta import CommitDeltaDatasink, open_table, read_dataset, version_for_build
    from emoji_ldm.store.latents import split_files
    from emoji_ldm.store.uri import DatasetRef, normalize_uri
    from emoji_ldm.version import code_version

    start = time.perf_counter()
    preset = config.preset_config()
    out = check_writable(config.out)
    table = _check_dataset(config.dataset)
    version = table.version()
    vae_given = normalize_uri(config.vae) if config.vae else None
    style = _caption_style(table)
    previous = _previous_encode(out, preset, vae_given, config.full)
    ensure_ray(dashboard=True)  # Ray Train's cleaner needs the State API
    dataset_uri = DatasetRef.parse(config.dataset).uri
    ds, _ = read_dataset(DatasetRef(dataset_uri, version=version), columns=["id", "image", "caption", "title"])
    ds = ds.map_batches(_text_rows, batch_format="numpy")
    vae_path = _vae_to_use(config, preset, out, vae_given, previous)
    build_id = uuid.uuid4().hex[:12]
    metadata = {
        "operation": "encode", "source": f"{dataset_uri}@{version}", "dataset": dataset_uri,
        "image": image_lineage(dataset_uri, vae_path or preset.vae.pretrained, preset),
        "dataset_version": version, "preset": preset.to_dict(), "vae": vae_path or preset.vae.pretrained,
        "text_encoder": preset.text.pretrained, "caption_style": style,
        "text_forms": FORMS[style],
        "code_version": code_version(), "build_id": build_id,
        "config": dataclasses.asdict(config), "message": f"encode {config.dataset}@{version} with {preset.name}",
    }
    mode, todo, removed = _rows_to_encode(ds, out, table, previous, preset, metadata)
    sink = CommitDeltaDatasink(out, schema=LATENT_SCHEMA, metadata={**metadata, "counts": {"removed": removed}},
                               mode=mode, partition_by=PARTITION)
    _encoded(todo, config, preset, vae_path, style).write_datasink(sink)
    latent_version = version_for_build(out, build_id)
    latest = open_table(f"{out}@{latent_version}")
    train_rows, val_rows = (sum(f.rows for f in split_files(latest, s)) for s in ("train", "val"))
    return {"out": out, "version": latent_version, "rows": train_rows + val_rows, "val": val_rows,
            "encoded": sink.rows_written, "removed": removed, "incremental": mode == "append",
            "dataset": config.dataset, "dataset_version": version, "vae": metadata["vae"],
            "seconds": time.perf_counter() - start}


def image_lineage(dataset_uri: str, vae: str | None, preset: Preset) -> dict:
    """How a model trained on these latents gets its alpha, for its model card: `dataset_mode` (RGBA or RGB),
    `vae_channels`, and `alpha`: "vae" (a 4-channel VAE draws it), "key" (a 3-channel VAE learned RGBA images
    on `key_colour`, which inference keys) or "none" (RGB data: opaque images)."""
    from emoji_ldm.store.artifacts import exists, read_json
    from emoji_ldm.store.sidecar import image_mode
    from emoji_ldm.store.uri import join

    mode = image_mode(dataset_uri)
    config = join(vae, preset.vae.subfolder, "config.json") if vae and preset.vae.subfolder else (
        join(vae, "config.json") if vae else None)
    if config and exists(config):
        channels = int(read_json(config).get("in_channels", 3))
    else:  # a hub id: the SD VAEs are RGB; a VAE trained here or pixel patches: the preset's channels
        channels = 3 if preset.vae.pretrained else preset.vae.channels
    alpha = "none" if mode == "RGB" else ("vae" if channels == 4 else "key")
    return {"dataset_mode": mode, "vae_channels": channels, "alpha": alpha,
            "key_colour": preset.vae.key_colour if alpha == "key" else None}


def _remove_rows(out: str, stale, metadata: dict) -> int:
    """Delete the rows of `stale` (id, caption) from the latent table, `DELETE_KEYS_PER_COMMIT` keys a commit;
    returns how many."""
    from emoji_ldm.store.delta import delete_matching

    schema = pa.schema([("id", pa.string()), ("caption", pa.string())])
    removed = 0
    for keys in stale.iter_batches(batch_size=DELETE_KEYS_PER_COMMIT, batch_format="pyarrow"):
        removed += delete_matching(out, keys.select(["id", "caption"]).cast(schema), metadata)
    return removed


def report(summary: dict) -> str:
    change = (f"{summary['encoded']} rows encoded, {summary['removed']} removed (incremental); "
              if summary["incremental"] else f"{summary['encoded']} rows encoded; ")
    return (f"encode: {change}the latent table has {summary['rows']} rows ({summary['val']} held out) from "
            f"{summary['dataset']}@{summary['dataset_version']} -> version {summary['version']} of "
            f"{summary['out']} | {summary['seconds']:.1f} s")
