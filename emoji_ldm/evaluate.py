"""Evaluate a trained model on its latent table.

    emoji-ldm eval --model URI --data LATENT_URI[@v] [--samples 32] [--clip DIR] [--out FILE.json]

Reports:
- held-out denoising loss: noise-prediction MSE on the `val` split at fixed
  noise and fixed timesteps (50, 250, 500, 750, 950), comparable across models;
- memorisation: the share of samples (prompted with held-out captions) whose
  nearest training image is a near-copy (pixel MSE below `--near-copy`);
- CLIP score of the samples when a local CLIP folder is given (`--clip`);
- FID/KID: not computed here; it says so (Inception weights cannot be
  downloaded on these machines).

Bounded at any table size: the held-out loss reads at most `--val-rows` rows of
the `val` split's files (from the Delta log, never the whole table); the
nearest-image search streams the images of the dataset version the model was
trained from through Ray Data tasks (held-out images included, so the
near-copy share is an upper bound), each task returning only its batch's
nearest distances, folded on the driver into one value per sample.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from emoji_ldm.errors import UserError
from emoji_ldm.options import opt
from emoji_ldm.sampling import SamplerSettings

TIMESTEPS = (50, 250, 500, 750, 950)


@dataclass(frozen=True)
class EvalConfig:
    model: str = opt(help="a model folder/URI (or a training --out)")
    data: str = opt(help="the latent table URI[@VERSION] it was trained on")
    samples: int = opt(32, help="samples for memorisation / CLIP score, 1-1024")
    sampler: SamplerSettings = opt(default_factory=SamplerSettings, skip=("count", "size", "negative_prompt"),
                                   help="sampler settings")
    near_copy: float = opt(0.005, help="pixel MSE (images in [0, 1]) below which a sample counts as a copy")
    val_rows: int = opt(2048, help="held-out rows for the denoising loss (read from the val split only)")
    clip: str | None = opt(None, help="a local CLIP model folder for the CLIP score")
    out: str | None = opt(None, help="also write the report as JSON here")

    def __post_init__(self):
        if not 1 <= self.samples <= 1024:
            raise UserError(f"--samples must be 1..1024, got {self.samples}")
        if self.val_rows < 1:
            raise UserError(f"--val-rows must be 1 or more, got {self.val_rows}")


def heldout_loss(unet, noise_sched, latents, text, seed: int = 0, batch: int = 64) -> float:
    """Noise-prediction MSE at fixed noise and timesteps over the given rows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    eps_all = torch.randn(latents.shape, generator=gen)  # fixed noise per row
    total, count = 0.0, 0
    with torch.no_grad():
        for t_value in TIMESTEPS:
            for i in range(0, len(latents), batch):
                x0, cond, eps = latents[i:i + batch], text[i:i + batch], eps_all[i:i + batch]
                t = torch.full((len(x0),), t_value, dtype=torch.long)
                pred = unet(noise_sched.add_noise(x0, eps, t), t, encoder_hidden_states=cond).sample
                total += float(torch.nn.functional.mse_loss(pred, eps, reduction="sum"))
                count += eps.numel()
    return total / count


def nearest_mse(samples: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(S, D) and (N, D) in [0, 1] -> MSE to the nearest training image, (S,)."""
    s2 = (samples**2).sum(1)[:, None]
    t2 = (train**2).sum(1)[None, :]
    d = (s2 + t2 - 2 * samples @ train.T) / samples.shape[1]
    return np.maximum(d.min(1), 0.0)


def clip_score(folder: str, images, prompts: list[str]) -> float:
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tok, proc = CLIPTokenizer.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=images, return_tensors="pt"))
        txt = model.get_text_features(**tok(prompts, padding=True, truncation=True, return_tensors="pt"))
    # transformers 5 returns model outputs whose pooler_output holds the projected features
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return float(100 * (img * txt).sum(-1).clamp(min=0).mean())


def _val_rows(table, n: int):
    """At most `n` rows of the held-out split (the train split when there is no val split): only its files."""
    import pyarrow.dataset as pds

    from emoji_ldm.store.latents import split_files
    from emoji_ldm.store.uri import filesystem

    files = split_files(table, "val") or split_files(table, "train")
    if not files:
        raise UserError(f"the latent table {table.table_uri!r} has no rows to evaluate on")
    fs, _ = filesystem(files[0].uri)
    paths = [filesystem(f.uri)[1] for f in files]
    return pds.dataset(paths, filesystem=fs, format="parquet").head(
        n, columns=["id", "caption", "latent", "latent_shape", "text_emb", "text_shape"])


def _nearest_batch(batch: dict, samples: np.ndarray, size: int) -> dict:
    """Ray Data task: a batch of training PNGs -> its smallest MSE to each sample, (1, S)."""
    from PIL import Image

    train = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize(
        (size, size), Image.Resampling.LANCZOS), dtype=np.float32).ravel() / 255.0 for png in batch["image"]])
    return {"nearest": nearest_mse(samples, train)[None, :]}


def nearest_training_mse(meta: dict, samples: np.ndarray, size: int) -> np.ndarray:
    """(S, D) samples -> MSE to the nearest image of the dataset version the model was trained from, (S,).

    Every image of that version is compared (train and held-out alike, so the near-copy share is an upper
    bound), streamed through Ray tasks that return only their batch's minima: no join, no id set.
    """
    from emoji_ldm.runtime import ensure_ray
    from emoji_ldm.store.delta import read_dataset
    from emoji_ldm.store.uri import DatasetRef

    ensure_ray()
    images, _ = read_dataset(DatasetRef(DatasetRef.parse(meta["dataset"]).uri, version=meta["dataset_version"]),
                             columns=["image"])
    nearest = images.map_batches(_nearest_batch, fn_kwargs={"samples": samples, "size": size}, batch_size=256,
                                 batch_format="numpy")
    best = np.full(len(samples), np.inf)
    for batch in nearest.iter_batches(batch_format="numpy"):
        best = np.minimum(best, batch["nearest"].min(axis=0))
    return best


def evaluate(config: EvalConfig) -> dict:
    import torch

    from emoji_ldm.generate import load_pipeline, run_pipeline
    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.models.presets import preset_from_dict
    from emoji_ldm.store.latents import decode_latents, open_latent_table

    ref, table, meta = open_latent_table(config.data)
    pipe = load_pipeline(config.model)
    preset = preset_from_dict(meta["preset"])
    val = _val_rows(table, config.val_rows)
    decoded = decode_latents({k: val.column(k).to_pylist() for k in ("latent", "latent_shape", "text_emb",
                                                                      "text_shape")})
    loss = heldout_loss(pipe.unet, noise_scheduler(preset), torch.from_numpy(decoded["latent"]).float(),
                        torch.from_numpy(decoded["text_emb"]).float(), seed=config.sampler.seed)

    prompts = (val.column("caption").to_pylist() * config.samples)[: config.samples]
    s = config.sampler
    images = run_pipeline(pipe, prompts, steps=s.steps, guidance=s.guidance, seed=s.seed)
    size = images[0].size[0]
    sample_px = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).ravel() / 255.0 for im in images])
    nearest = nearest_training_mse(meta, sample_px, size)
    report = {
        "model": config.model, "latent_table": f"{ref.uri}@{table.version()}", "val_rows": val.num_rows,
        "heldout_loss": loss, "timesteps": list(TIMESTEPS), "samples": len(images),
        "near_copy_share": float((nearest < config.near_copy).mean()), "near_copy_threshold": config.near_copy,
        "nearest_mse_median": float(np.median(nearest)),
        "clip_score": clip_score(config.clip, images, prompts) if config.clip else None,
        "fid_kid": "not computed: needs Inception weights, which cannot be downloaded on this machine",
    }
    if config.out:
        with open(config.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def format_report(r: dict) -> str:
    clip = f"{r['clip_score']:.2f}" if r["clip_score"] is not None else "not computed (pass --clip DIR, a local CLIP)"
    return "\n".join([
        f"eval {r['model']} on {r['latent_table']} ({r['val_rows']} held-out rows)",
        f"  held-out denoising loss: {r['heldout_loss']:.4f} (fixed noise, t = {r['timesteps']})",
        f"  memorisation: {100 * r['near_copy_share']:.1f}% of {r['samples']} samples are near-copies of a "
        f"training image (MSE < {r['near_copy_threshold']}; median nearest MSE {r['nearest_mse_median']:.4f})",
        f"  CLIP score: {clip}",
        f"  FID/KID: {r['fid_kid']}",
    ])
