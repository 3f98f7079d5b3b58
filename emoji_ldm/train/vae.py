"""Stage 1: train the `tiny` preset's own AutoencoderKL (reconstruction + KL) on Ray Train.

Input: a dataset version (`URI[@v]`). Output under `--out`:
  config.json, diffusion_pytorch_model.safetensors   the AutoencoderKL (diffusers), with the measured latent
                                                     scaling factor in its config
  metrics.json, vae_card.json                        the final figures; the card (dataset URI + version, preset,
                                                     code version) is written last
  metrics.jsonl, loss.png, tensorboard/              rank 0's record of the run
  checkpoints/                                       while it trains (`--resume` continues from the latest);
                                                     removed once the VAE is written

    emoji-ldm train-vae --dataset URI[@v] --preset tiny --out URI [--workers 2] [--max-steps N] [--resume]

The workers run the one training loop (`loop.py`) on a DeepSpeed engine in fp32 without ZeRO (stage 0: every
rank holds the whole model and its optimizer, gradients averaged as DDP does), on their in-memory shard of the
decoded images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import Preset, PresetOptions, preset_from_dict
from emoji_ldm.train.lr import warmup_cosine

# The decoded images the workers hold, at most (all workers together): 32,768 RGBA images at 64 px in fp16
SAMPLE_BYTES = 2**30

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAETrainConfig(PresetOptions):
    dataset: str = opt(help="URI, URI@VERSION or URI@TAG")
    out: str = opt(help="where the AutoencoderKL folder goes (local or s3://)")
    workers: int = opt(2, help="Ray Train workers")
    max_steps: int | None = opt(None, help="default: the preset's vae.train_steps")
    checkpoint_every: int = opt(250, help="checkpoint every N steps (and at the end)")
    log_every: int = opt(50, help="log the loss every N steps")
    resume: bool = opt(False, help="continue from the latest checkpoint under --out")
    max_failures: int = opt(2, help="worker restarts from the last checkpoint")

    def __post_init__(self):
        if self.workers <= 0:
            raise UserError(f"--workers must be positive, got {self.workers}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max-steps must be positive, got {self.max_steps}")
        if self.checkpoint_every <= 0 or self.log_every <= 0:
            raise UserError(f"--checkpoint-every and --log-every must be positive, got {self.checkpoint_every}, "
                            f"{self.log_every}")
        if self.max_failures < 0:
            raise UserError(f"--max-failures must be 0 or more, got {self.max_failures}")

    def resolved_preset(self) -> Preset:
        preset = self.preset_config()
        if not preset.vae.trained_here:
            has = (f"uses the pretrained VAE {preset.vae.pretrained!r}" if preset.vae.pretrained else
                   "draws pixels (vae.kind=patches) and has no VAE")
            raise UserError(f"preset {preset.name!r} {has}; train-vae is only for presets that train their own (tiny)")
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


@dataclass(frozen=True)
class VAERun:
    """Everything a worker needs, passed explicitly through `train_loop_config`."""

    preset: dict  # the resolved preset (Preset.to_dict())
    max_steps: int
    out: str
    use_gpu: bool
    log_every: int
    checkpoint_every: int


def worker(run: VAERun) -> None:
    """A Ray Train worker: the VAE's recipe in the loop, then rank 0 writes the VAE."""
    from emoji_ldm.train import loop

    loop.run(_recipe(run))


def _recipe(run: VAERun):
    import ray.train
    import torch

    from emoji_ldm.models.builders import VAEWithLoss, build_vae
    from emoji_ldm.train import loop, runner
    from emoji_ldm.train.data import shard_to_numpy
    from emoji_ldm.train.speed import SpeedOptions
    from emoji_ldm.train.step import to_device

    preset = preset_from_dict(run.preset)
    spec, fp32 = preset.vae, SpeedOptions(precision="no")  # the VAE trains in fp32, on a GPU too
    w = runner.setup_worker(run.use_gpu, 1, preset.train.seed, fp32)
    pixels = torch.from_numpy(shard_to_numpy(ray.train.get_dataset_shard("train"), ["pixels"])["pixels"])
    micro = max(1, spec.train_batch_size // w.world)
    model = VAEWithLoss(build_vae(preset))
    params = list(model.parameters())
    engine, scheduler = runner.create_engine(
        model, params, lr=spec.train_lr, weight_decay=1e-4, lr_lambda=warmup_cosine(0, run.max_steps, 0.1),
        micro=micro, grad_accum=1, grad_clip=1.0, zero_stage=0, worker=w, speed=fp32)

    def batches(counters: dict):
        while True:  # (B, C, H, W) in [-1, 1], C = vae.channels (4: RGBA)
            yield to_device(pixels[torch.randint(0, len(pixels), (micro,))], w.device)

    def forward(x):
        recon, kl = engine(x)  # (B, C, H, W), (B,)
        rec = reconstruction_loss(recon, x, spec.colour_loss)
        return rec + spec.kl_weight * kl.mean(), {"rec_loss": rec}

    describe = (f"preset {preset.name}'s VAE, {sum(p.numel() for p in params) / 1e6:.2f}M params, {spec.channels} "
                f"channels, {len(pixels)} images on rank 0, lr {spec.train_lr:g}; {fp32.summary(run.use_gpu)}")
    return loop.Recipe(
        tag="train-vae", out=run.out, worker=w, engine=engine, scheduler=scheduler, zero_stage=0, params=params,
        micro=micro, batches=batches, forward=forward, describe=describe, meta=_resume_settings(preset),
        schedule=loop.Schedule(run.max_steps, run.log_every, run.checkpoint_every),
        export=lambda ema, log: _export(model.vae, pixels, run, w, log))


def _resume_settings(preset: Preset) -> dict:
    """What a checkpoint records and a --resume must match (beside the world size): the VAE's shape."""
    vae = preset.to_dict()["vae"]
    shape = {k: vae[k] for k in ("block_out_channels", "layers_per_block", "channels", "latent_channels")}
    return json.loads(json.dumps({"image_size": preset.image_size, "vae": shape}))  # as state.json holds it


def _export(vae, pixels, run: VAERun, worker, log) -> None:
    """Rank 0: the trained VAE (fp32, the optimizer's own weights at ZeRO stage 0) with its latent scaling factor
    as a diffusers folder at OUT, and its figures in metrics.json."""
    import tempfile

    from emoji_ldm.store.artifacts import upload_dir

    if not worker.main:
        return
    metrics = {"loss": log.last_loss, "steps": run.max_steps, **_reconstruction(vae, pixels, worker.device)}
    vae.register_to_config(scaling_factor=metrics["scaling_factor"])
    with tempfile.TemporaryDirectory() as tmp:
        vae.save_pretrained(tmp)
        with open(f"{tmp}/metrics.json", "w") as f:
            json.dump(metrics, f)
        upload_dir(tmp, run.out, last=("metrics.json",))


def _reconstruction(vae, pixels, device) -> dict:
    """The latent scaling factor (1/std) and the reconstruction error of up to 512 of this rank's images."""
    import torch
    import torch.nn.functional as F

    from emoji_ldm.models.builders import on_grey

    vae.eval()
    with torch.no_grad():
        sample = pixels[: min(512, len(pixels))].to(device).float()
        latents = vae.encode(sample).latent_dist.mean  # (N, C, h, w)
        recon = vae.decode(latents).sample  # (N, C, H, W)
    rgb = float(F.mse_loss(recon[:, :3], sample[:, :3]))  # colour and alpha apart: the ceiling of what follows
    four = sample.shape[1] == 4
    return {
        "scaling_factor": float(1.0 / latents.std()), "recon_mse": float(F.mse_loss(recon, sample)),
        "recon_mse_rgb": rgb, "recon_mse_alpha": float(F.mse_loss(recon[:, 3], sample[:, 3])) if four else None,
        # what a viewer sees: the reconstruction on mid-grey against the image on mid-grey
        "recon_mse_visible": float(F.mse_loss(on_grey(recon.clamp(-1, 1)), on_grey(sample))) if four else rgb,
    }


# --- the driver ----------------------------------------------------------------------


def sample_cap(preset: Preset, steps: int) -> int:
    """How many images the VAE's workers hold, at most: it draws steps x batch images, so a uniform sample of at
    most that many, and at most SAMPLE_BYTES of decoded pixels: bounded by neither the table nor --vae-steps."""
    image_bytes = 2 * preset.vae.channels * preset.image_size ** 2  # fp16 (C, H, W)
    return min(steps * preset.vae.train_batch_size, SAMPLE_BYTES // image_bytes)


def _training_images(config: VAETrainConfig, preset: Preset, steps: int):
    """The decoded images the workers train on, materialized: (dataset, version, the table's rows, its rows)."""
    from emoji_ldm.store.delta import open_table, read_dataset, row_count
    from emoji_ldm.store.uri import DatasetRef
    from emoji_ldm.train.data import decode_images

    ds, version = read_dataset(config.dataset, columns=["id", "image"])
    total = row_count(open_table(f"{DatasetRef.parse(config.dataset).uri}@{version}"))  # the log's, free
    cap = sample_cap(preset, steps)
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
    return ds, version, total, rows


def train_vae(config: VAETrainConfig) -> dict:
    """Train the preset's VAE on a dataset version; returns its card."""
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, read_json, write_json
    from emoji_ldm.store.uri import DatasetRef, filesystem
    from emoji_ldm.train import runner
    from emoji_ldm.version import code_version

    preset = config.resolved_preset()
    out = check_writable(config.out)
    now = {"world_size": config.workers, **_resume_settings(preset)}
    runner.refuse_or_resume(out, config.resume, lambda state: runner.check_saved(state, now, out),
                            use_gpu=config.use_gpu, precision="no")
    ensure_ray(dashboard=True)  # Ray Train's cleaner needs the State API
    steps = config.max_steps or preset.vae.train_steps
    ds, version, total, rows = _training_images(config, preset, steps)
    require_shared(out, "the VAE folder (--out)")
    run = VAERun(preset=preset.to_dict(), max_steps=steps, out=out, use_gpu=config.use_gpu,
                 log_every=config.log_every, checkpoint_every=config.checkpoint_every)
    runner.fit(worker, run, name="train-vae", out=out, workers=config.workers, use_gpu=config.use_gpu,
               max_failures=config.max_failures, datasets={"train": ds})
    metrics = read_json(artifact_uri(out, "metrics.json"))
    fs, path = filesystem(artifact_uri(out, "checkpoints"))
    fs.delete_dir(path)  # the VAE under OUT is what the run was for
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
    four = m["recon_mse_alpha"] is not None
    apart = (f" (colour {m['recon_mse_rgb']:.4f}, alpha {m['recon_mse_alpha']:.4f}, as seen on mid-grey "
             f"{m['recon_mse_visible']:.4f})" if four else "")
    return (f"train-vae: {m['steps']} steps, loss {m['loss']:.4f}, reconstruction MSE {m['recon_mse']:.4f}{apart}, "
            f"latent scaling factor {m['scaling_factor']:.4f} -> {card['out']}")

