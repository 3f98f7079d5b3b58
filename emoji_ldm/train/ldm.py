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

Each Ray Train worker (`worker`) builds the UNet's recipe (`_recipe`: its engine, data stream, loss, EMA
and validation grids) and runs it in the one training loop (`loop.py`); it gets everything through
`train_loop_config`. Model code comes from `emoji_ldm.models` and knows nothing of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import PresetOptions, get_preset, preset_from_dict, saved_section
from emoji_ldm.train import checkpoint
from emoji_ldm.train.lr import preset_schedule
from emoji_ldm.train.speed import SpeedOptions

logger = logging.getLogger(__name__)

# Parts of the preset that must match to resume from a checkpoint.
_RESUME_KEYS = ("image_size", "vae", "text", "unet", "noise")


@dataclass(frozen=True)
class TrainConfig(PresetOptions):
    data: str = opt(help="latent table URI[@VERSION]")
    out: str = opt(help="run output URI: model/, checkpoints/, samples/, metrics")
    workers: int = opt(2, help="Ray Train workers")
    zero_stage: int | None = opt(None, help="DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3 (default: "
                                            "the preset's train.zero_stage)")
    batch_size: int | None = opt(None, help="global batch (default: the preset's; with --gpu, its "
                                            "train.gpu_micro_batch per GPU where it has one)")
    max_steps: int | None = opt(None, help="optimizer steps (default: the preset's)")
    epochs: float | None = opt(None, help="passes over the training rows instead of --max-steps")
    resume: bool = opt(False, help="continue from the latest checkpoint under --out")
    max_failures: int = opt(2, help="worker restarts from the last checkpoint")
    shuffle_buffer: int = opt(2048, help="rows in each worker's shuffle buffer (its memory: rows x row size)")
    speed: SpeedOptions = opt(default_factory=SpeedOptions, help="the GPU fast path: precision, TF32, "
                                                                 "checkpointing, channels-last, compile")
    threads_per_worker: int = opt(1, cli=False, help="torch threads per worker")

    def __post_init__(self):
        if self.zero_stage is not None and (not isinstance(self.zero_stage, int) or not 0 <= self.zero_stage <= 3):
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
        # what the preset states, resolved once (frozen): the run, its config.json and its card say which
        object.__setattr__(self, "zero_stage", preset.train.zero_stage)
        if self.use_gpu and self.speed.precision == "auto":
            object.__setattr__(self, "speed", dataclasses.replace(self.speed, precision=preset.train.precision))
        per_step = self.workers * preset.train.grad_accum
        if preset.train.batch_size % per_step:
            raise UserError(
                f"batch size {preset.train.batch_size} is not divisible by workers x grad_accum = "
                f"{self.workers} x {preset.train.grad_accum}; pick a multiple of {per_step}"
            )

    def resolved_preset(self):
        """The preset with the command line's settings; with --gpu, a preset's `gpu_micro_batch` per GPU sets the
        global batch unless --batch-size (or --set train.batch_size) gives one."""
        overrides = dict(self.overrides)
        if self.zero_stage is not None:
            overrides["train.zero_stage"] = self.zero_stage
        if self.batch_size is not None:
            overrides["train.batch_size"] = self.batch_size
        if self.max_steps is not None:
            overrides["train.max_steps"] = self.max_steps
        train = get_preset(self.preset, overrides).train
        if self.use_gpu and train.gpu_micro_batch and "train.batch_size" not in overrides:
            overrides["train.batch_size"] = train.gpu_micro_batch * self.workers * train.grad_accum
        return get_preset(self.preset, overrides)


# --- the worker --------------------------------------------------------------------


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
    shuffle_buffer: int = 2048
    prefetch_batches: int = 4
    speed: SpeedOptions = SpeedOptions()


def worker(run: WorkerConfig) -> None:
    """A Ray Train worker: the UNet's recipe in the loop."""
    from emoji_ldm.train import loop

    loop.run(_recipe(run))


def _recipe(run: WorkerConfig):
    """The UNet under DeepSpeed, this rank's stream of the latent table, the diffusion loss, the EMA and grids."""
    import torch

    from emoji_ldm.models.builders import build_unet, configure_trainable, noise_scheduler
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.latents import RankStream, split_files
    from emoji_ldm.store.uri import DatasetRef
    from emoji_ldm.train import loop, runner
    from emoji_ldm.train.speed import batch_layout, prepare_unet
    from emoji_ldm.train.step import micro_batch_loss, to_device

    preset = preset_from_dict(run.preset)
    tc = preset.train
    w = runner.setup_worker(run.use_gpu, run.threads, tc.seed, run.speed)
    micro = tc.batch_size // (w.world * tc.grad_accum)
    files = split_files(open_table(DatasetRef(run.latent_uri, version=run.latent_version)))
    stream = RankStream(files, w.rank, w.world, micro, seed=tc.seed, shuffle_buffer=run.shuffle_buffer,
                        prefetch=run.prefetch_batches)
    empty = torch.tensor(run.empty_emb, dtype=torch.float32, device=w.device)  # (L, D)
    unet = prepare_unet(build_unet(preset), run.speed, convert_weights=False)  # channels-last: in create_engine
    params = configure_trainable(unet, preset)
    engine, scheduler = runner.create_engine(
        unet, params, lr=tc.lr, weight_decay=tc.weight_decay, lr_lambda=preset_schedule(preset), micro=micro,
        grad_accum=tc.grad_accum, grad_clip=tc.grad_clip, zero_stage=run.zero_stage, worker=w, speed=run.speed,
        adam_beta2=tc.adam_beta2)
    noise = noise_scheduler(preset)

    def batches(counters: dict):
        """The stream from the checkpoint's position: `pos` micro-batches of epoch `epoch` already trained on."""
        while True:
            for batch in stream.epoch(counters["epoch"], skip=counters["pos"]):
                counters["pos"] += 1
                yield batch
            counters["epoch"], counters["pos"] = counters["epoch"] + 1, 0

    def forward(batch):
        latents = to_device(batch["latent"], w.device, batch_layout(run.speed))  # (B, C, h, w)
        text = to_device(batch["text_emb"], w.device)  # (B, L, D), or (B, K, L, D): K forms of each caption
        return micro_batch_loss(engine, noise, latents, text, empty, tc, preset.noise.prediction_type, w.dtype), {}

    describe = _describe(preset, engine.module, stream.batches_per_epoch, run)
    return loop.Recipe(
        tag="train", out=run.out, worker=w, engine=engine, scheduler=scheduler, zero_stage=run.zero_stage,
        params=params, micro=micro, batches=batches, forward=forward, describe=describe,
        schedule=loop.Schedule(tc.max_steps, tc.log_every, tc.checkpoint_every, tc.grad_accum, tc.sample_every,
                               run.speed.profile_steps),
        counters={"step": 0, "epoch": 0, "pos": 0}, meta={"preset": {k: run.preset[k] for k in _RESUME_KEYS}},
        ema=tc, grid=_Validation(preset, run, w).grid, config=preset.to_dict(),
        storage=checkpoint.RayTrainStorage(upload="async" if run.speed.async_checkpoints else "sync"))


def _describe(preset, unet, batches_per_epoch: int, run: WorkerConfig) -> str:
    """The banner's recipe half, from the engine's UNet (its parameters are ZeRO-3 partitions under stage 3)."""
    from emoji_ldm.train.runner import numel

    total, trainable = numel(unet.parameters()), numel(p for p in unet.parameters() if p.requires_grad)
    return (f"preset {preset.name}, UNet {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable, mode "
            f"{preset.unet.finetune}), {batches_per_epoch} micro-batches per rank per epoch; "
            f"{run.speed.summary(run.use_gpu)}, attention: scaled_dot_product_attention")


class _Validation:
    """Rank 0's sample grids from the EMA weights, on the worker's device in the training dtype (the VAE in fp32
    under fp16, as inference keeps it).

    The pipeline (VAE, text encoder, a UNet of its own) is built once per run; each grid copies the EMA into
    its UNet's trained parameters. The rest are as `build_unet` makes them (the pretrained weights a fine-tune
    freezes), exactly as the export builds its UNet, so nothing is read from the engine (under ZeRO-3 that
    would be a gather the other ranks never join).
    """

    def __init__(self, preset, run: WorkerConfig, worker):
        self.preset, self.run, self.worker = preset, run, worker
        self.pipe = None

    def grid(self, ema, step: int, log) -> None:
        import torch

        from emoji_ldm.inference.sampler import ImageAlpha, image_grid, run_pipeline
        from emoji_ldm.models.builders import build_unet, configure_trainable
        from emoji_ldm.train.export import assemble_pipeline

        if self.pipe is None:
            unet = build_unet(self.preset)
            self.params = configure_trainable(unet, self.preset)
            unet.requires_grad_(False)
            self.pipe = assemble_pipeline(unet, self.preset, self.run.vae).to(self.worker.device, self.worker.dtype)
            if self.worker.dtype == torch.float16:  # as inference keeps it: the SD VAE's decoder overflows in fp16
                self.pipe.vae.to(torch.float32)  # (the Sampler decodes in the VAE's dtype)
        ema.copy_to(self.params)
        prompts = list(self.preset.sample_prompts)
        images = run_pipeline(self.pipe, prompts, steps=20, guidance=self.preset.guidance, seed=0,
                              alpha=ImageAlpha.of({"image": self.run.image}))
        log.grid(image_grid(images, prompts), step)


# --- the driver ----------------------------------------------------------------------


def _check_resume(state: dict, preset, config: TrainConfig) -> None:
    saved = {k: saved_section(k, v) for k, v in state["preset"].items()}
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


def _checked_preset(config: TrainConfig, table, enc_meta: dict):
    """The preset to train, after everything the user can get wrong about the table: from the Delta log only,
    before a worker starts. `--epochs` becomes the preset's max_steps."""
    from emoji_ldm.store.latents import split_files

    preset = config.resolved_preset()
    encoded_with = preset_from_dict(enc_meta["preset"])
    same_text = all(getattr(encoded_with.text, k) == getattr(preset.text, k)
                    for k in ("pretrained", "kind", "subfolder", "max_length"))  # what makes the embeddings
    same_latents = ((encoded_with.vae.kind, encoded_with.vae.latent_channels, encoded_with.latent_size)
                    == (preset.vae.kind, preset.vae.latent_channels, preset.latent_size))
    if not same_text or not same_latents or preset.image_size != encoded_with.image_size:
        raise UserError(f"the latent table was encoded with preset {encoded_with.name!r} (its text encoder, image "
                        f"size or latents differ from {preset.name!r}'s): encode again or train with --preset "
                        f"{encoded_with.name}")
    n_train = sum(f.rows for f in split_files(table))
    micro = preset.train.batch_size // (config.workers * preset.train.grad_accum)
    if n_train // config.workers < micro:
        raise UserError(f"latent table {config.data!r} has {n_train} training rows: fewer than the micro batch "
                        f"{micro} for each of the {config.workers} workers; lower --batch-size (now "
                        f"{preset.train.batch_size}) or use fewer --workers")
    if config.epochs is None:
        return preset
    steps = max(1, math.ceil(config.epochs * n_train / preset.train.batch_size))
    return get_preset(config.preset, {**config.overrides, "train.max_steps": steps,
                                      "train.batch_size": preset.train.batch_size})


def train(config: TrainConfig) -> dict:
    """Run training and export the EMA model; returns the model card."""
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, write_json
    from emoji_ldm.store.latents import empty_caption, open_latent_table
    from emoji_ldm.train import runner

    ref, table, enc_meta = open_latent_table(config.data)
    latent_version = table.version()
    preset = config.resolved_preset()
    out = check_writable(config.out)
    runner.refuse_or_resume(out, config.resume, lambda state: _check_resume(state, preset, config),
                            use_gpu=config.use_gpu, precision=config.speed.resolved_precision(config.use_gpu))
    preset = _checked_preset(config, table, enc_meta)
    ensure_ray(dashboard=True)
    for uri, what in ((ref.uri, "the latent table (--data)"), (out, "the run folder (--out)"),
                      (enc_meta["vae"], "the VAE the latent table was encoded with")):
        require_shared(uri, what)

    write_json(artifact_uri(out, "config.json"), {"preset": preset.to_dict(), "run": dataclasses.asdict(config),
                                                  "latent_table": f"{ref.uri}@{latent_version}"})
    run = WorkerConfig(
        preset=preset.to_dict(), latent_uri=ref.uri, latent_version=latent_version, zero_stage=config.zero_stage,
        use_gpu=config.use_gpu, threads=config.threads_per_worker, empty_emb=empty_caption(ref.uri).tolist(),
        out=out, vae=enc_meta["vae"], image=enc_meta["image"],
        shuffle_buffer=config.shuffle_buffer, speed=config.speed,
    )
    result = runner.fit(worker, run, name="run", out=out, workers=config.workers, use_gpu=config.use_gpu,
                        max_failures=config.max_failures)
    return _export(config, preset, ref.uri, latent_version, enc_meta, result.metrics, out)


def _export(config: TrainConfig, preset, latent_uri: str, latent_version: int, enc_meta: dict, metrics: dict,
            out: str) -> dict:
    """The EMA of the last checkpoint as OUT/model, with its card (returned)."""
    from emoji_ldm.store.artifacts import artifact_uri
    from emoji_ldm.store.latents import encoded_dataset
    from emoji_ldm.train.checkpoint import latest
    from emoji_ldm.train.export import export_model
    from emoji_ldm.version import code_version

    final = latest(out)
    if final is None:
        raise RuntimeError(f"training ended without a checkpoint under {out}/checkpoints")
    card = {
        "kind": "emoji-ldm model", "preset": preset.name, "config": preset.to_dict(),
        "dataset": encoded_dataset(enc_meta), "dataset_version": enc_meta.get("dataset_version"),
        "latent_table": latent_uri, "latent_table_version": latent_version, "vae": enc_meta["vae"],
        "text_encoder": preset.text.pretrained, "code_version": code_version(), "image": enc_meta["image"],
        # how typed prompts reach the model (inference/prompts.py): in the form of the captions it learned
        "prompt_style": enc_meta.get("caption_style", "as-typed"),
        "guidance": preset.guidance,  # what the Sampler draws it at unless a caller sets one
        "training": {"workers": config.workers, "zero_stage": config.zero_stage, "steps": final[1]["step"],
                     "global_batch": preset.train.batch_size},
        "metrics": metrics,
    }
    card = export_model(final[0], preset, enc_meta["vae"], artifact_uri(out, "model"), card)
    return {**card, "out": out}


def report(card: dict) -> str:
    loss = card["metrics"].get("loss")
    out = card["out"].rstrip("/")
    return (f"train: {card['training']['steps']} steps, final loss {loss if loss is None else round(loss, 4)} -> "
            f"model {out}/model, samples {out}/samples")
