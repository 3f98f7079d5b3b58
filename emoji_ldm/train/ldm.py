"""Train the latent diffusion UNet on a latent table: Ray Train workers driving DeepSpeed ZeRO.

Input: a latent table version (`emoji-ldm encode`). Output under `--out`:
  model/            the EMA model as a diffusers StableDiffusionPipeline folder + model_card.json
  checkpoints/      Ray Train runs; each `step-XXXXXXXX` holds the sharded DeepSpeed
                    checkpoint of every rank, the EMA weights and the data position
  config.json       the resolved preset and run settings
  metrics.jsonl     one line per logged step; loss.png the loss curve
  samples/          a grid of the preset's sample prompts every K steps

    emoji-ldm train --data LATENT_URI[@v] --preset tiny --out URI [--workers 2] [--zero-stage 2]
                    [--batch-size B] [--max-steps N | --epochs E] [--resume]

The worker loop (`train_loop`) gets everything through `train_loop_config`;
model code comes from `emoji_ldm.models` and knows nothing of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import PresetOptions, get_preset, preset_from_dict
from emoji_ldm.train.speed import SpeedOptions

logger = logging.getLogger(__name__)

# Parts of the preset that must match to resume from a checkpoint.
_RESUME_KEYS = ("image_size", "vae", "text", "unet", "noise")


@dataclass(frozen=True)
class TrainConfig(PresetOptions):
    data: str = opt(help="latent table URI[@VERSION]")
    out: str = opt(help="run output URI: model/, checkpoints/, samples/, metrics")
    workers: int = opt(2, help="Ray Train workers")
    zero_stage: int = opt(2, help="DeepSpeed ZeRO stage: 0, 1, 2 or 3")
    batch_size: int | None = opt(None, help="global batch (default: the preset's)")
    max_steps: int | None = opt(None, help="optimizer steps (default: the preset's)")
    epochs: float | None = opt(None, help="passes over the training rows instead of --max-steps")
    resume: bool = opt(False, help="continue from the latest checkpoint under --out")
    max_failures: int = opt(2, help="worker restarts from the last checkpoint")
    shuffle_buffer: int = opt(2048, help="rows in each worker's shuffle buffer (its memory: rows x row size)")
    speed: SpeedOptions = opt(default_factory=SpeedOptions, help="the GPU fast path: precision, TF32, "
                                                                 "checkpointing, channels-last, compile")
    threads_per_worker: int = opt(1, cli=False, help="torch threads per worker")
    crash_at_step: int | None = opt(None, cli=False, help="fault injection for tests: rank 1 dies once here")
    user_error_at_step: int | None = opt(None, cli=False, help="fault injection for tests: a UserError on rank 1")

    def __post_init__(self):
        if not isinstance(self.zero_stage, int) or not 0 <= self.zero_stage <= 3:
            raise UserError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.workers <= 0:
            raise UserError(f"--workers must be positive, got {self.workers}")
        if self.max_steps is not None and self.epochs is not None:
            raise UserError("give --max-steps or --epochs, not both")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max-steps must be positive, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.shuffle_buffer < 1:
            raise UserError(f"--shuffle-buffer must be 1 or more rows, got {self.shuffle_buffer}")
        if self.max_failures < 0:
            raise UserError(f"--max-failures must be 0 or more, got {self.max_failures}")
        self.speed.resolved_precision(self.use_gpu)  # fp16 without --gpu is refused here
        preset = self.resolved_preset()
        per_step = self.workers * preset.train.grad_accum
        if preset.train.batch_size % per_step:
            raise UserError(
                f"batch size {preset.train.batch_size} is not divisible by workers x grad_accum = "
                f"{self.workers} x {preset.train.grad_accum}; pick a multiple of {per_step}"
            )

    def resolved_preset(self):
        overrides = dict(self.overrides)
        if self.batch_size is not None:
            overrides["train.batch_size"] = self.batch_size
        if self.max_steps is not None:
            overrides["train.max_steps"] = self.max_steps
        return get_preset(self.preset, overrides)


# --- the worker --------------------------------------------------------------------


def _lr_lambda(preset):
    t = preset.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        floor = t.min_lr / t.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a training worker needs, passed explicitly through `train_loop_config`."""

    preset: dict  # the resolved preset (Preset.to_dict())
    latent_uri: str  # the latent table: shared storage on a cluster
    latent_version: int
    zero_stage: int
    use_gpu: bool
    threads: int
    empty_emb: list  # the empty caption's text embedding, (L, D)
    out: str
    vae: str
    image: dict  # how the model gets alpha (the card's `image`): its validation grids draw it so
    resume_from: str | None = None
    fault: str | None = None  # runner.maybe_fail, for tests
    shuffle_buffer: int = 2048
    prefetch_batches: int = 4
    speed: SpeedOptions = SpeedOptions()


def _train_worker(run: WorkerConfig) -> None:
    import torch

    from emoji_ldm.models.builders import build_unet, configure_trainable, count_params, noise_scheduler
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.latents import RankStream, split_files
    from emoji_ldm.store.uri import DatasetRef
    from emoji_ldm.train import checkpoint, runner
    from emoji_ldm.train.ema import make_ema, master_weights, update_ema
    from emoji_ldm.train.metrics import MetricsLogger
    from emoji_ldm.train.speed import batch_layout, prepare_unet
    from emoji_ldm.train.step import grad_norm, training_step

    preset = preset_from_dict(run.preset)
    tc = preset.train
    w = runner.setup_worker(run.use_gpu, run.threads, tc.seed, run.speed)
    micro = tc.batch_size // (w.world * tc.grad_accum)
    files = split_files(open_table(DatasetRef(run.latent_uri, version=run.latent_version)))
    stream = RankStream(files, w.rank, w.world, micro, seed=tc.seed, shuffle_buffer=run.shuffle_buffer,
                        prefetch=run.prefetch_batches)
    empty = torch.tensor(run.empty_emb, dtype=torch.float32, device=w.device)  # (L, D)

    unet = prepare_unet(build_unet(preset), run.speed, convert_weights=False)  # DeepSpeed: see batch_layout
    params = configure_trainable(unet, preset)
    engine, scheduler = runner.create_engine(
        unet, params, lr=tc.lr, weight_decay=tc.weight_decay, lr_lambda=_lr_lambda(preset), micro=micro,
        grad_accum=tc.grad_accum, grad_clip=tc.grad_clip, zero_stage=run.zero_stage, worker=w, speed=run.speed)
    # The EMA in fp32 from the optimizer's fp32 masters (a bf16 copy would stop moving); only rank 0 keeps it,
    # every rank takes part in reading the masters (a gather under ZeRO).
    masters = master_weights(params)  # every rank takes part in the gathers; rank 0 keeps what they give
    ema = make_ema(masters, tc).to(w.device) if w.main else None
    for _ in masters:  # ranks other than 0: the same gathers, nothing kept
        pass
    noise = noise_scheduler(preset)

    counters = {"step": 0, "epoch": 0, "pos": 0}  # pos: micro-batches of the epoch already trained on
    resumed = checkpoint.restore(engine, run.resume_from, counters, rank=w.rank, device=w.device, ema=ema)
    log = MetricsLogger(run.out, "train", tc.max_steps, counters["step"], preset.to_dict()) if w.main else None
    if log:
        if resumed:
            log.print(f"resumed from {resumed} at step {counters['step']} (epoch {counters['epoch']}, batch "
                      f"{counters['pos']} of {stream.batches_per_epoch})")
        total, trainable = count_params(unet), count_params(unet, trainable_only=True)
        log.print(f"preset {preset.name}: {w.world} workers, ZeRO stage {run.zero_stage}, global batch "
                  f"{micro * w.world * tc.grad_accum} (micro {micro} x {w.world} workers x accum {tc.grad_accum}), "
                  f"UNet {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable, mode {preset.unet.finetune}), "
                  f"{stream.batches_per_epoch} micro-batches per rank per epoch, steps {counters['step']}->"
                  f"{tc.max_steps}; {run.speed.summary(run.use_gpu)}, attention: scaled_dot_product_attention")
    validation = _Validation(preset, run, w) if w.main else None
    meta = {"world_size": w.world, "zero_stage": run.zero_stage, "preset": {k: run.preset[k] for k in _RESUME_KEYS}}

    losses, norms, images, seconds, timed, skipped = [], [], 0, 0.0, 0, 0
    micro_step = 0
    while counters["step"] < tc.max_steps:
        for batch in stream.epoch(counters["epoch"], skip=counters["pos"]):
            t0 = time.perf_counter()
            latents = torch.from_numpy(batch["latent"]).to(w.device, torch.float32,  # (B, C, h, w)
                                                            memory_format=batch_layout(run.speed))
            text = torch.from_numpy(batch["text_emb"]).to(w.device, torch.float32)  # (B, L, D)
            loss = training_step(engine, noise, latents, text, empty, tc, preset.noise.prediction_type, w.dtype)
            counters["pos"] += 1
            micro_step += 1
            losses.append(loss)
            images += len(latents) * w.world
            seconds += time.perf_counter() - t0
            if micro_step % tc.grad_accum:
                continue
            if not runner.step_applied(engine):  # fp16 overflow: DeepSpeed skipped the update and the LR step
                skipped += 1
                continue
            counters["step"] += 1
            step = counters["step"]
            norm = grad_norm(engine)  # before clipping; the same value on every rank
            if norm is not None:
                norms.append(norm)
            update_ema(ema, params)
            timed += 1
            runner.maybe_fail(run.fault, step, w, run.out)
            if step % tc.log_every == 0 or step == tc.max_steps:
                mean, skipped_all = runner.mean_over_ranks([torch.stack(losses).float().mean(), skipped], w)
                if log:
                    log.log(step, mean, scheduler.get_last_lr()[0], seconds / timed, images / seconds,
                            float(np.mean(norms)) if norms else None,
                            **({"skipped_steps": skipped_all * w.world} if skipped_all else {}))
                losses, norms, images, seconds, timed, skipped = [], [], 0, 0.0, 0, 0
            if (tc.sample_every and step % tc.sample_every == 0) or step == tc.max_steps:
                if validation:
                    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
                        validation.grid(ema, step, log)  # must not shift the training RNG stream
            if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                checkpoint.save(engine, counters, meta, rank=w.rank, device=w.device, ema=ema, log=log,
                                metrics={"loss": log.last_loss if log else None})
            if step >= tc.max_steps:
                break
        else:  # the epoch ran out
            counters["epoch"] += 1
            counters["pos"] = 0


class _Validation:
    """Rank 0's sample grids from the EMA weights, on the worker's device in the training dtype.

    The pipeline (VAE, text encoder, a UNet of its own) is built once per run; each grid copies the EMA into
    its UNet's trained parameters. The rest are as `build_unet` makes them (the pretrained weights a fine-tune
    freezes), exactly as the export builds its UNet, so nothing is read from the engine (under ZeRO-3 that
    would be a gather the other ranks never join).
    """

    def __init__(self, preset, run: WorkerConfig, worker):
        self.preset, self.run, self.worker = preset, run, worker
        self.pipe = None

    def grid(self, ema, step: int, log) -> None:
        from emoji_ldm.inference.sampler import ImageAlpha, image_grid, run_pipeline
        from emoji_ldm.models.builders import build_unet, configure_trainable
        from emoji_ldm.train.export import assemble_pipeline

        if self.pipe is None:
            unet = build_unet(self.preset)
            self.params = configure_trainable(unet, self.preset)
            unet.requires_grad_(False)
            self.pipe = assemble_pipeline(unet, self.preset, self.run.vae).to(self.worker.device, self.worker.dtype)
        ema.copy_to(self.params)
        prompts = list(self.preset.sample_prompts)
        images = run_pipeline(self.pipe, prompts, steps=20, guidance=4.0, seed=0,
                              alpha=ImageAlpha.of({"image": self.run.image}))
        log.grid(image_grid(images, prompts), step)


# --- the driver ----------------------------------------------------------------------


def latest_checkpoint(out: str) -> tuple[str, dict] | None:
    """(path, state.json) of the newest complete checkpoint under OUT/checkpoints, if any."""
    from emoji_ldm.train.checkpoint import latest

    return latest(out)


def _check_resume(state: dict, preset, config: TrainConfig) -> None:
    saved = state["preset"]
    current = preset.to_dict()
    diffs = [k for k in _RESUME_KEYS if json.dumps(saved[k], sort_keys=True) != json.dumps(current[k], sort_keys=True)]
    if diffs:
        raise UserError(f"--resume: the checkpoint was trained with a different {', '.join(diffs)} config; "
                        "resume with the same preset and overrides, or train into a new --out")
    if state["world_size"] != config.workers or state["zero_stage"] != config.zero_stage:
        raise UserError(
            f"--resume: the checkpoint was written by {state['world_size']} workers at ZeRO stage "
            f"{state['zero_stage']}; resume with --workers {state['world_size']} --zero-stage {state['zero_stage']}"
        )


def train(config: TrainConfig) -> dict:
    """Run training and export the EMA model; returns the model card."""
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, write_json
    from emoji_ldm.store.latents import empty_caption, encoded_dataset, open_latent_table, split_files
    from emoji_ldm.train import runner
    from emoji_ldm.train.export import export_model
    from emoji_ldm.version import code_version

    preset = config.resolved_preset()
    ref, table, enc_meta = open_latent_table(config.data)
    latent_version = table.version()
    encoded_with = enc_meta["preset"]
    same_text = all(encoded_with["text"].get(k) == getattr(preset.text, k)
                    for k in ("pretrained", "kind", "subfolder", "max_length"))  # what makes the embeddings
    if not same_text or preset.image_size != encoded_with["image_size"]:
        raise UserError(f"the latent table was encoded with preset {enc_meta['preset']['name']!r} "
                        f"(text encoder / image size differ from {preset.name!r}): encode again or use that preset")
    out = check_writable(config.out)
    existing = runner.refuse_or_resume(out, config.resume, lambda state: _check_resume(state, preset, config))

    # Everything the user can get wrong is checked here, before a worker starts: from the Delta log only.
    n_train = sum(f.rows for f in split_files(table))
    micro = preset.train.batch_size // (config.workers * preset.train.grad_accum)
    if n_train // config.workers < micro:
        raise UserError(f"latent table {config.data!r} has {n_train} training rows: fewer than the micro batch "
                        f"{micro} for each of the {config.workers} workers; lower --batch-size (now "
                        f"{preset.train.batch_size}) or use fewer --workers")
    if config.epochs is not None:
        steps = max(1, math.ceil(config.epochs * n_train / preset.train.batch_size))
        preset = get_preset(config.preset, {**config.overrides, "train.max_steps": steps,
                                             "train.batch_size": preset.train.batch_size})

    ensure_ray(dashboard=True)
    for uri, what in ((ref.uri, "the latent table (--data)"), (out, "the run folder (--out)"),
                      (enc_meta["vae"], "the VAE the latent table was encoded with")):
        require_shared(uri, what)

    write_json(artifact_uri(out, "config.json"), {"preset": preset.to_dict(), "run": dataclasses.asdict(config),
                                                  "latent_table": f"{ref.uri}@{latent_version}"})
    # how the model gets its alpha (`encode.image_lineage`); latent tables before RGBA: RGB, opaque
    image = enc_meta.get("image") or {"dataset_mode": "RGB", "alpha": "none", "key_colour": None}
    fault = (f"exit@{config.crash_at_step}" if config.crash_at_step else
             f"user-error@{config.user_error_at_step}" if config.user_error_at_step else None)
    run = WorkerConfig(
        preset=preset.to_dict(), latent_uri=ref.uri, latent_version=latent_version, zero_stage=config.zero_stage,
        use_gpu=config.use_gpu, threads=config.threads_per_worker, empty_emb=empty_caption(ref.uri).tolist(),
        out=out, vae=enc_meta["vae"], image=image, resume_from=existing[0] if existing else None, fault=fault,
        shuffle_buffer=config.shuffle_buffer, speed=config.speed,
    )
    result = runner.fit(_train_worker, run, name="run", out=out, workers=config.workers, use_gpu=config.use_gpu,
                        max_failures=config.max_failures)
    final = latest_checkpoint(out)
    if final is None:
        raise RuntimeError(f"training ended without a checkpoint under {out}/checkpoints")
    card = {
        "kind": "emoji-ldm model", "preset": preset.name, "config": preset.to_dict(),
        "dataset": encoded_dataset(enc_meta), "dataset_version": enc_meta.get("dataset_version"),
        "latent_table": ref.uri, "latent_table_version": latent_version, "vae": enc_meta["vae"],
        "text_encoder": preset.text.pretrained, "code_version": code_version(),
        "image": image,
        "training": {"workers": config.workers, "zero_stage": config.zero_stage, "steps": final[1]["step"],
                     "global_batch": preset.train.batch_size},
        "metrics": result.metrics,
    }
    card = export_model(final[0], preset, enc_meta["vae"], artifact_uri(out, "model"), card)
    return {**card, "out": out}


def report(card: dict) -> str:
    loss = card["metrics"].get("loss")
    out = card["out"].rstrip("/")
    return (f"train: {card['training']['steps']} steps, final loss {loss if loss is None else round(loss, 4)} -> "
            f"model {out}/model, samples {out}/samples")
