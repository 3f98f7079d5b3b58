"""Stage 1: train the `tiny` preset's own AutoencoderKL (reconstruction + KL) on Ray Train.

Input: a dataset version (`URI[@v]`). Output: a diffusers AutoencoderKL folder at
`--out` with `vae_card.json` (dataset URI + version, preset, code version,
final loss, the measured latent scaling factor).

    emoji-ldm train-vae --dataset URI[@v] --preset tiny --out URI [--workers 2] [--max-steps N]
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import Preset, PresetOptions, preset_from_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAETrainConfig(PresetOptions):
    dataset: str = opt(help="URI, URI@VERSION or URI@TAG")
    out: str = opt(help="where the AutoencoderKL folder goes (local or s3://)")
    workers: int = opt(2, help="Ray Train workers")
    max_steps: int | None = opt(None, help="default: the preset's vae.train_steps")

    def __post_init__(self):
        if self.workers <= 0:
            raise UserError(f"--workers must be positive, got {self.workers}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max-steps must be positive, got {self.max_steps}")

    def resolved_preset(self) -> Preset:
        preset = self.preset_config()
        if not preset.vae.trained_here:
            raise UserError(
                f"preset {preset.name!r} uses the pretrained VAE {preset.vae.pretrained!r}; "
                "train-vae is only for presets that train their own (tiny)"
            )
        return preset


def reconstruction_loss(recon, x, colour_loss: str = "straight"):
    """MSE + 0.5 L1 of (B, C, H, W) pixels in [-1, 1]. A 4-channel VAE's with `colour_loss` "premultiplied"
    compares colour x alpha (and alpha): a pixel's colour costs as much as it shows on any background, so
    the colour hidden under nearly transparent edge pixels (noisy after a premultiplied resize) costs
    nothing."""
    import torch

    from emoji_ldm.models.builders import premultiplied

    if x.shape[1] == 4 and colour_loss == "premultiplied":
        recon, x = premultiplied(recon), premultiplied(x)
    return torch.nn.functional.mse_loss(recon, x) + 0.5 * torch.nn.functional.l1_loss(recon, x)


def vae_train_loop(config: dict) -> None:
    """Ray Train worker (`runner.fit`): DDP over the in-memory image shard."""
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from emoji_ldm.models.builders import VAEWithLoss, build_vae, on_grey
    from emoji_ldm.train.data import shard_to_numpy
    from emoji_ldm.train.metrics import print_once

    preset = preset_from_dict(config["preset"])
    spec = preset.vae
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(preset.train.seed + rank)
    device = ray.train.torch.get_device()  # prepare_model puts the model there; batches follow
    pixels = torch.from_numpy(shard_to_numpy(ray.train.get_dataset_shard("train"), ["pixels"])["pixels"])
    micro = max(1, spec.train_batch_size // world)
    vae = build_vae(preset)
    model = prepare_model(VAEWithLoss(vae), parallel_strategy="ddp")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.train_lr, weight_decay=1e-4)
    steps = config["max_steps"]
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1  # to 10% of the lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    gen = torch.Generator().manual_seed(preset.train.seed * 1000 + rank)
    if rank == 0:
        print_once(f"[train-vae] {world} workers, global batch {micro * world}, {steps} steps, "
                   f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, {len(pixels)} images on rank 0")
    t0, loss_val = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(pixels), (micro,), generator=gen)
        x = pixels[idx].to(device).float()  # (B, C, H, W) in [-1, 1], C = vae.channels (4: RGBA)
        recon, kl = model(x, gen if device.type == "cpu" else None)  # (B, C, H, W), (B,)
        rec_loss = reconstruction_loss(recon, x, spec.colour_loss)
        loss = rec_loss + spec.kl_weight * kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        if rank == 0 and (step % 50 == 0 or step == steps):
            dt = time.perf_counter() - t0
            print_once(f"[train-vae] step {step}/{steps} loss {loss_val:.4f} rec {float(rec_loss.detach()):.4f} "
                       f"{step * micro * world / dt:.0f} images/s")

    metrics = {"loss": loss_val, "steps": steps}
    if rank == 0:
        inner = (model.module if hasattr(model, "module") else model).vae
        inner.eval()
        with torch.no_grad():
            sample = pixels[: min(512, len(pixels))].to(device).float()
            latents = inner.encode(sample).latent_dist.mean  # (N, C, h, w)
            scale = float(1.0 / latents.std())
            recon = inner.decode(latents).sample  # (N, C, H, W)
            recon_mse = float(torch.nn.functional.mse_loss(recon, sample))
            # colour and alpha apart: the autoencoder is the ceiling of everything after it
            recon_rgb = float(torch.nn.functional.mse_loss(recon[:, :3], sample[:, :3]))
            four = sample.shape[1] == 4
            recon_alpha = float(torch.nn.functional.mse_loss(recon[:, 3], sample[:, 3])) if four else None
            # what a viewer sees: the reconstruction on mid-grey against the image on mid-grey
            recon_visible = float(torch.nn.functional.mse_loss(on_grey(recon.clamp(-1, 1)), on_grey(sample))) \
                if four else recon_rgb
        inner.register_to_config(scaling_factor=scale)
        metrics.update(scaling_factor=scale, recon_mse=recon_mse, recon_mse_rgb=recon_rgb, recon_mse_alpha=recon_alpha,
                       recon_mse_visible=recon_visible)
        with tempfile.TemporaryDirectory() as tmp:
            inner.save_pretrained(tmp)
            with open(f"{tmp}/metrics.json", "w") as f:
                json.dump(metrics, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_vae(config: VAETrainConfig) -> dict:
    """Train the preset's VAE on a dataset version; returns its card."""
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, upload_dir, write_json
    from emoji_ldm.store.delta import open_table, read_dataset, row_count
    from emoji_ldm.store.uri import DatasetRef, filesystem
    from emoji_ldm.train import runner
    from emoji_ldm.train.data import decode_images
    from emoji_ldm.version import code_version

    preset = config.resolved_preset()
    out = check_writable(config.out)
    ensure_ray(dashboard=True)  # Ray Train's cleaner needs the State API
    ds, version = read_dataset(config.dataset, columns=["id", "image"])
    steps = config.max_steps or preset.vae.train_steps
    # The VAE draws steps x batch images, so it is shown a uniform sample of at most that many (from the Delta
    # log's row count, free): what the workers hold is bounded by the run, not by the table.
    total, cap = row_count(open_table(f"{DatasetRef.parse(config.dataset).uri}@{version}")), \
        steps * preset.vae.train_batch_size
    if total > cap:  # (at least 256 expected rows: a sample is never empty by chance)
        ds = ds.random_sample(min(1.0, max(1.1 * cap, 256) / total), seed=preset.train.seed)
    # Decode before the workers start: on a small node the training workers hold every CPU,
    # and Ray Data tasks scheduled after them would wait for ever.
    ds = ds.map_batches(decode_images, fn_kwargs={"size": preset.image_size, "channels": preset.vae.channels,
                                                  "key_colour": preset.vae.key_colour},
                        batch_format="numpy").materialize()
    rows = ds.count()  # free on a materialized dataset
    if rows == 0:
        raise UserError(f"dataset {config.dataset!r} (version {version}) has no rows to train on")
    require_shared(out, "the VAE folder (--out)")
    storage = artifact_uri(out, "_emoji_ldm", "train")  # beside the VAE, where every node reaches
    result = runner.fit(vae_train_loop, {"preset": preset.to_dict(), "max_steps": steps}, name="train-vae", out=out,
                        workers=config.workers, use_gpu=config.use_gpu, max_failures=0, datasets={"train": ds},
                        storage_uri=storage)
    with result.checkpoint.as_directory() as folder:
        metrics = json.load(open(f"{folder}/metrics.json"))
        upload_dir(folder, out)
    fs, path = filesystem(storage)
    fs.delete_dir_contents(path, missing_dir_ok=True)  # the run's checkpoint is the VAE now under OUT
    card = {
        "kind": "vae", "out": out, "dataset": DatasetRef.parse(config.dataset).uri, "dataset_version": version,
        "rows": rows, "dataset_rows": total,  # the images it was shown (a sample when the table is bigger)
        "preset": preset.to_dict(), "code_version": code_version(), "metrics": metrics,
    }
    write_json(artifact_uri(out, "vae_card.json"), card)
    logger.info("VAE written to %s (scaling factor %.4f)", out, metrics["scaling_factor"])
    return card


def report(card: dict) -> str:
    m = card["metrics"]
    four = m.get("recon_mse_alpha") is not None and "recon_mse_visible" in m  # (cards before it: no visible)
    apart = (f" (colour {m['recon_mse_rgb']:.4f}, alpha {m['recon_mse_alpha']:.4f}, as seen on mid-grey "
             f"{m['recon_mse_visible']:.4f})" if four else "")
    return (f"train-vae: {m['steps']} steps, loss {m['loss']:.4f}, reconstruction MSE {m['recon_mse']:.4f}{apart}, "
            f"latent scaling factor {m['scaling_factor']:.4f} -> {card['out']}")

