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
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import Preset, PresetOptions, preset_from_dict
from emoji_ldm.options import opt
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

    def __post_init__(self):
        if self.batch_size <= 0 or self.concurrency <= 0:
            raise UserError(f"batch_size and concurrency must be positive, got {self.batch_size}, {self.concurrency}")


class Encoder:
    """Ray Data actor: one VAE + text encoder per actor, called on batches of dataset rows."""

    def __init__(self, preset: dict, vae_path: str | None, device: str):
        import torch

        from emoji_ldm.models.builders import build_vae, load_text_encoder, vae_scaling_factor
        from emoji_ldm.store.artifacts import local_copy

        self.preset = preset_from_dict(preset)
        self.device = torch.device(device)
        self.vae = build_vae(self.preset, local_copy(vae_path) if vae_path else None).to(self.device).eval()
        self.scale = vae_scaling_factor(self.vae, self.preset)
        self.tokenizer, self.text = load_text_encoder(self.preset)
        self.text.to(self.device)

    def __call__(self, batch: dict) -> dict:
        import torch

        from emoji_ldm.models.builders import encode_text
        from emoji_ldm.train.data import decode_images, split_of

        size = self.preset.image_size
        pixels = torch.from_numpy(decode_images({"image": batch["image"]}, size)["pixels"]).float()
        captions = [c if c else (t or "") for c, t in zip(batch["caption"], batch["title"])]
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.device)).latent_dist.mean * self.scale  # (B, C, h, w)
            emb, _, truncated = encode_text(self.tokenizer, self.text, captions, self.preset.text.max_length)
        if truncated:
            logger.warning("%d caption(s) longer than %d tokens were truncated", truncated,
                           self.preset.text.max_length)
        latents = latents.cpu().numpy().astype(np.float16)
        emb = emb.cpu().numpy().astype(np.float16)  # (B, L, D)
        return {
            "id": batch["id"],
            "caption": np.array(captions, dtype=object),
            "split": np.array([split_of(i) for i in batch["id"]], dtype=object),
            "latent": np.array([x.tobytes() for x in latents], dtype=object),
            "latent_shape": np.array([list(latents.shape[1:])] * len(latents), dtype=object),
            "text_emb": np.array([x.tobytes() for x in emb], dtype=object),
            "text_shape": np.array([list(emb.shape[1:])] * len(emb), dtype=object),
        }


def empty_caption_embedding(preset: Preset) -> np.ndarray:
    """The text embedding of "" (caption dropout trains on it), (L, D) float16."""
    from emoji_ldm.models.builders import encode_text, load_text_encoder

    tokenizer, model = load_text_encoder(preset)
    emb, _, _ = encode_text(tokenizer, model, [""], preset.text.max_length)
    return emb[0].numpy().astype(np.float16)


def _to_table(batch: dict) -> pa.Table:
    return pa.Table.from_pydict({k: list(v) for k, v in batch.items()}, schema=LATENT_SCHEMA)


def encode(config: EncodeConfig) -> dict:
    """Encode a dataset version into a new version of the latent table; returns a summary."""
    from emoji_ldm.runtime import ensure_ray
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, write_bytes
    from emoji_ldm.store.delta import CommitDeltaDatasink, open_table, read_dataset, version_for_build
    from emoji_ldm.store.uri import DatasetRef, normalize_uri
    from emoji_ldm.version import code_version

    start = time.perf_counter()
    preset = config.preset_config()
    out = check_writable(config.out)
    # Checked on the Delta table itself (clear errors for a missing dataset / version / tag),
    # before Ray starts and without reading the images.
    table = open_table(config.dataset)
    version = table.version()
    meta = table.to_pyarrow_table(columns=["caption", "title"]).to_pandas()
    if len(meta) == 0:
        raise UserError(f"dataset {config.dataset!r} (version {version}) has no rows to encode")
    has_text = (meta["caption"].fillna("").str.len() > 0) | (meta["title"].fillna("").str.len() > 0)
    if not has_text.any():
        raise UserError(f"dataset {config.dataset!r} has no captions or titles: caption it first")
    ensure_ray(dashboard=True)  # Ray Train's cleaner needs the State API
    ds, _ = read_dataset(DatasetRef(DatasetRef.parse(config.dataset).uri, version=version),
                         columns=["id", "image", "caption", "title"])

    vae_path = config.vae
    if preset.vae.trained_here and not vae_path:
        from emoji_ldm.train.vae import VAETrainConfig, train_vae

        vae_path = artifact_uri(out, "_emoji_ldm", "vae")
        print(f"[encode] preset {preset.name!r} trains its own VAE and no --vae was given: "
              f"training one first ({config.vae_steps or preset.vae.train_steps} steps) -> {vae_path}", flush=True)
        train_vae(VAETrainConfig(dataset=config.dataset, out=vae_path, preset=config.preset,
                                 overrides=config.overrides, use_gpu=config.use_gpu, workers=config.vae_workers,
                                 max_steps=config.vae_steps))
    elif vae_path:
        vae_path = normalize_uri(vae_path)

    buf = io.BytesIO()
    np.savez(buf, emb=empty_caption_embedding(preset))
    write_bytes(artifact_uri(out, "_emoji_ldm", "empty_caption.npz"), buf.getvalue())

    import ray.data

    build_id = uuid.uuid4().hex[:12]
    encoded = ds.map_batches(
        Encoder,
        fn_constructor_kwargs={"preset": preset.to_dict(), "vae_path": vae_path,
                               "device": "cuda" if config.use_gpu else "cpu"},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_gpus=1 if config.use_gpu else 0,
    ).map_batches(_to_table, batch_format="numpy")
    counts = {"rows": int(len(meta))}
    metadata = {
        "operation": "encode",
        "source": f"{DatasetRef.parse(config.dataset).uri}@{version}",
        "dataset": config.dataset, "dataset_version": version,
        "preset": preset.to_dict(), "vae": vae_path or preset.vae.pretrained, "text_encoder": preset.text.pretrained,
        "code_version": code_version(), "build_id": build_id, "counts": counts,
        "config": dataclasses.asdict(config), "message": f"encode {config.dataset}@{version} with {preset.name}",
    }
    sink = CommitDeltaDatasink(out, schema=LATENT_SCHEMA, metadata=metadata, mode="overwrite",
                               partition_by=PARTITION)
    encoded.write_datasink(sink)
    latent_version = version_for_build(out, build_id)
    table = open_table(f"{out}@{latent_version}").to_pyarrow_table(columns=["split"])
    val = table.column("split").to_pylist().count("val")
    summary = {"out": out, "version": latent_version, "rows": table.num_rows, "val": val,
               "dataset": config.dataset, "dataset_version": version, "vae": metadata["vae"],
               "seconds": time.perf_counter() - start}
    return summary


def report(summary: dict) -> str:
    return (f"encode: {summary['rows']} rows ({summary['val']} held out) from {summary['dataset']}@"
            f"{summary['dataset_version']} -> version {summary['version']} of {summary['out']} | "
            f"{summary['seconds']:.1f} s")
