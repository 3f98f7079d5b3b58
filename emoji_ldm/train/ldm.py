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
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import PresetOptions, get_preset, preset_from_dict
from emoji_ldm.options import opt
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


def deepspeed_config(micro: int, grad_accum: int, grad_clip: float, zero_stage: int, precision: str) -> dict:
    """The DeepSpeed config of `train` and `dreambooth` (micro batch per worker, ZeRO stage, precision)."""
    from emoji_ldm.train.speed import deepspeed_precision

    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        **deepspeed_precision(precision),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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
    run_name: str
    resume_from: str | None = None
    crash_at_step: int | None = None
    shuffle_buffer: int = 2048
    prefetch_batches: int = 4
    speed: SpeedOptions = SpeedOptions()


def train_loop(loop_config: dict) -> None:
    """Ray Train worker: a DeepSpeed engine over this rank's stream of the latent table.

    A `UserError` (a model that does not load, say) is a mistake a restart
    cannot fix: every rank meets it the same way and returns, rank 0 leaves
    its message in the run folder, and the driver raises it as one line
    instead of Ray retrying.
    """
    run_worker(_train_worker, loop_config["run"])


def run_worker(worker, run) -> None:
    """`worker(run)` in a Ray Train worker; a `UserError` is left by rank 0 under `run.out` for the driver
    (`raise_worker_error`) instead of failing the worker (`train` and `dreambooth` share this)."""
    import ray.train

    try:
        worker(run)
    except UserError as e:
        if ray.train.get_context().get_world_rank() == 0:
            from emoji_ldm.store.artifacts import artifact_uri, write_bytes

            write_bytes(artifact_uri(run.out, *_WORKER_ERROR), str(e).splitlines()[0].encode())


def _train_worker(run: WorkerConfig) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if run.use_gpu else "cpu")
    import deepspeed
    import ray.train
    import torch

    from emoji_ldm.models.builders import build_unet, configure_trainable, count_params, noise_scheduler
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.latents import RankStream, split_files
    from emoji_ldm.store.uri import DatasetRef
    from emoji_ldm.train.speed import batch_layout, compile_engine, prepare_unet, torch_dtype
    from emoji_ldm.train.step import grad_norm, make_ema, training_step

    preset = preset_from_dict(run.preset)
    tc = preset.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(run.threads)
    torch.manual_seed(tc.seed * 7919 + rank)
    # the one place that picks the device: model, EMA, batches, the empty caption and metrics follow it
    device = ray.train.torch.get_device() if run.use_gpu else torch.device("cpu")
    precision = run.speed.resolved_precision(run.use_gpu)
    dtype = torch_dtype(precision)  # what DeepSpeed runs the module in; the batches are cast to it
    micro = tc.batch_size // (world * tc.grad_accum)

    files = split_files(open_table(DatasetRef(run.latent_uri, version=run.latent_version)))
    stream = RankStream(files, rank, world, micro, seed=tc.seed, shuffle_buffer=run.shuffle_buffer,
                        prefetch=run.prefetch_batches)
    empty = torch.tensor(run.empty_emb, dtype=torch.float32, device=device)  # (L, D)

    unet = prepare_unet(build_unet(preset), run.speed, convert_weights=False)  # DeepSpeed: see batch_layout
    params = configure_trainable(unet, preset)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(preset))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=unet, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(micro, tc.grad_accum, tc.grad_clip, run.zero_stage, precision),
        dist_init_required=False,
    )
    compile_engine(engine, run.speed)
    zero3 = run.zero_stage == 3
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):  # the full weights, on the engine's device
        ema = make_ema(params, tc)
    noise = noise_scheduler(preset)

    state = {"step": 0, "epoch": 0, "pos": 0}  # pos: micro-batches of the epoch already trained on
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and run.resume_from:
        checkpoint = ray.train.Checkpoint(run.resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _, client = engine.load_checkpoint(folder, tag="ds", load_lr_scheduler_states=True)
            state = {k: client[k] for k in state}
            ema.load_state_dict(torch.load(Path(folder) / "ema.pt", weights_only=False))
            ema.to(device)
            rng = Path(folder) / f"rng-rank{rank}.pt"
            if rng.exists():  # exact continuation: the noise and caption-dropout draws go on where they stopped
                torch.set_rng_state(torch.load(rng, weights_only=False))
        if rank == 0:
            print(f"[train] resumed from {checkpoint.path} at step {state['step']} (epoch {state['epoch']}, "
                  f"batch {state['pos']} of {stream.batches_per_epoch})", flush=True)

    if rank == 0:
        total, trainable = count_params(unet), count_params(unet, trainable_only=True)
        print(
            f"[train] preset {preset.name}: {world} workers, ZeRO stage {run.zero_stage}, global batch "
            f"{micro * world * tc.grad_accum} (micro {micro} x {world} workers x accum {tc.grad_accum}), "
            f"UNet {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable, mode {preset.unet.finetune}), "
            f"{stream.batches_per_epoch} micro-batches per rank per epoch, steps {state['step']}->{tc.max_steps}; "
            f"{run.speed.summary(run.use_gpu)}, attention: scaled_dot_product_attention",
            flush=True,
        )

    log = _RankZeroLog(run, preset, resumed_at=state["step"]) if rank == 0 else None
    losses, norms, images, step_seconds, steps_timed = [], [], 0, 0.0, 0
    micro_step = 0
    while state["step"] < tc.max_steps:
        for batch in stream.epoch(state["epoch"], skip=state["pos"]):
            t0 = time.perf_counter()
            latents = torch.from_numpy(batch["latent"]).to(device, torch.float32,  # (B, C, h, w)
                                                            memory_format=batch_layout(run.speed))
            text = torch.from_numpy(batch["text_emb"]).to(device, torch.float32)  # (B, L, D)
            loss = training_step(engine, noise, latents, text, empty, tc,
                                 preset.noise.prediction_type, dtype)
            state["pos"] += 1
            micro_step += 1
            losses.append(loss)
            images += len(latents) * world
            if micro_step % tc.grad_accum:
                step_seconds += time.perf_counter() - t0
                continue
            state["step"] += 1
            norm = grad_norm(engine)  # before clipping; the same value on every rank
            if norm is not None:
                norms.append(norm)
            if zero3:  # sharded parameters: every rank takes part in the gather
                with deepspeed.zero.GatheredParameters(params):
                    ema.step(params)
            elif rank == 0:  # full parameters on every rank: only rank 0 keeps (and saves) the EMA
                ema.step(params)
            step_seconds += time.perf_counter() - t0  # the step itself: not sampling, not checkpoints
            steps_timed += 1
            step = state["step"]
            _maybe_crash(run, step, rank)
            if step % tc.log_every == 0 or step == tc.max_steps:
                mean = torch.stack(losses).float().mean().to(device)
                torch.distributed.all_reduce(mean)  # a device tensor: NCCL takes no CPU tensors
                if log:
                    log.step(step, float(mean) / world, scheduler.get_last_lr()[0], step_seconds / steps_timed,
                             images / step_seconds, float(np.mean(norms)) if norms else None)
                losses, norms, images, step_seconds, steps_timed = [], [], 0, 0.0, 0
            sample_now = tc.sample_every and step % tc.sample_every == 0
            if sample_now or step == tc.max_steps:
                with torch.random.fork_rng():  # sampling must not shift the training RNG stream
                    _sample(engine, ema, params, preset, run, step, log, zero3)
            if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                _checkpoint(engine, ema, state, run, rank, world, log, step)
            if step >= tc.max_steps:
                break
        else:  # the epoch ran out
            state["epoch"] += 1
            state["pos"] = 0


def _maybe_crash(run: WorkerConfig, step: int, rank: int) -> None:
    """Fault injection for tests: rank 1 exits hard once at `crash_at_step` (a marker file makes it once)."""
    if run.crash_at_step != step or rank != 1:
        return
    marker = Path(tempfile.gettempdir()) / f"emoji-ldm-crashed-{run.run_name}"
    if not marker.exists():
        marker.write_text("crashed once")
        print(f"[train] fault injection: rank {rank} exits at step {step}", flush=True)
        os._exit(1)


def _checkpoint(engine, ema, state, run: WorkerConfig, rank, world, log, step) -> None:
    import shutil

    import ray.train
    import torch

    folder = tempfile.mkdtemp(prefix="emoji-ldm-ckpt-")
    engine.save_checkpoint(folder, tag="ds", client_state=dict(state))  # every rank writes its shard
    torch.save(torch.get_rng_state(), Path(folder) / f"rng-rank{rank}.pt")
    if rank == 0:
        torch.save(ema.state_dict(), Path(folder) / "ema.pt")
        meta = {**state, "world_size": world, "zero_stage": run.zero_stage,
                "preset": {k: run.preset[k] for k in _RESUME_KEYS}}
        (Path(folder) / "state.json").write_text(json.dumps(meta, indent=2))
        if log:
            log.flush()
    metrics = {"step": step, "loss": log.last_loss if log else None}
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_dir_name=f"step-{step:08d}")
    shutil.rmtree(folder, ignore_errors=True)  # report() has copied it to the run's storage


def _sample(engine, ema, params, preset, run: WorkerConfig, step, log, zero3) -> None:
    """EMA weights -> sample grid of the preset's prompts (rank 0 renders; ZeRO-3 gathers on all ranks)."""
    import deepspeed

    from emoji_ldm.models.builders import build_unet, configure_trainable

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=zero3):
        if log is None:
            return
        # A fresh UNet, not a deepcopy: the engine's module carries ZeRO-3 hooks.
        weights = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    unet = build_unet(preset)
    configure_trainable(unet, preset)
    unet.load_state_dict(weights)
    ema.copy_to([p for p in unet.parameters() if p.requires_grad])
    log.samples(unet.eval(), step)


class _RankZeroLog:
    """Rank 0's outputs, copied to OUT: per-step lines, metrics.jsonl, loss.png, the validation sample grids, and
    the same as TensorBoard events under tensorboard/ (loss, lr, images/s, grad norm, grids)."""

    def __init__(self, run: WorkerConfig, preset, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        from emoji_ldm.store.artifacts import artifact_uri, exists, read_bytes

        self.run, self.preset = run, preset
        self.local = Path(tempfile.mkdtemp(prefix="emoji-ldm-train-"))
        self.rows: list[dict] = []
        self.last_loss = None
        previous = artifact_uri(run.out, "metrics.jsonl")
        if resumed_at and exists(previous):  # keep the history up to the checkpoint we resumed from
            rows = [json.loads(line) for line in read_bytes(previous).decode().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["step"] <= resumed_at]
            (self.local / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        # a new events file beside the earlier ones in OUT/tensorboard; purge_step hides the steps after the
        # checkpoint that the killed run had logged, as TensorBoard does for a resumed run
        self.tb = SummaryWriter(str(self.local / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)
        if not resumed_at:
            self.tb.add_text("preset", "```\n" + json.dumps(preset.to_dict(), indent=2) + "\n```", 0)

    def step(self, step: int, loss: float, lr: float, step_time: float, images_s: float,
             grad_norm: float | None) -> None:
        self.last_loss = loss
        row = {"step": step, "loss": loss, "lr": lr, "step_time_s": step_time, "images_per_s": images_s,
               "grad_norm": grad_norm, "time": time.time()}
        for name, value in (("loss", loss), ("lr", lr), ("images_per_s", images_s), ("grad_norm", grad_norm)):
            if value is not None:
                self.tb.add_scalar(f"train/{name}", value, step)
        self.rows.append(row)
        with open(self.local / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[train] step {step}/{self.preset.train.max_steps} loss {loss:.4f} lr {lr:.2e} "
              f"{step_time * 1000:.0f} ms/step {images_s:.0f} images/s", flush=True)

    def flush(self) -> None:
        from emoji_ldm.store.artifacts import artifact_uri, upload_dir, write_bytes

        if (self.local / "metrics.jsonl").exists():
            write_bytes(artifact_uri(self.run.out, "metrics.jsonl"), (self.local / "metrics.jsonl").read_bytes())
        if self.rows:
            write_bytes(artifact_uri(self.run.out, "loss.png"), loss_curve_png(self.rows))
        samples = self.local / "samples"
        if samples.exists():
            upload_dir(samples, artifact_uri(self.run.out, "samples"))
        self.tb.flush()
        upload_dir(self.local / "tensorboard", artifact_uri(self.run.out, "tensorboard"))

    def samples(self, unet, step: int) -> None:
        from emoji_ldm.inference.sampler import image_grid, run_pipeline
        from emoji_ldm.train.export import assemble_pipeline

        pipe = assemble_pipeline(unet, self.preset, self.run.vae)
        prompts = list(self.preset.sample_prompts)
        images = run_pipeline(pipe, prompts, steps=20, guidance=4.0, seed=0)
        (self.local / "samples").mkdir(exist_ok=True)
        grid = image_grid(images, prompts)
        grid.save(self.local / "samples" / f"step-{step:08d}.png")
        self.tb.add_image("validation/samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        self.flush()


def loss_curve_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1.2)
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"mean of {k}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --- the driver ----------------------------------------------------------------------


def latest_checkpoint(out: str) -> tuple[str, dict] | None:
    """(path, state.json) of the newest complete checkpoint under OUT/checkpoints, if any."""
    import pyarrow.fs as pafs

    from emoji_ldm.store.artifacts import artifact_uri
    from emoji_ldm.store.uri import filesystem, is_s3

    root = artifact_uri(out, "checkpoints")
    fs, path = filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return None
    found = []
    for info in infos:
        if info.path.endswith("/state.json") and "/step-" in info.path:
            folder = info.path.rsplit("/", 1)[0]
            with fs.open_input_stream(info.path) as f:
                state = json.loads(f.read())
            names = [i.base_name for i in infos if i.path.startswith(folder + "/")]
            shards = sum(1 for n in names if n.endswith("optim_states.pt"))
            if shards >= state["world_size"] or state["zero_stage"] == 0:
                found.append((state["step"], ("s3://" + folder) if is_s3(out) else folder, state))
    if not found:
        return None
    _, folder, state = max(found, key=lambda f: f[0])
    return folder, state


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
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from emoji_ldm.runtime import ensure_ray, require_shared
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, write_json
    from emoji_ldm.store.latents import empty_caption, encoded_dataset, open_latent_table, split_files
    from emoji_ldm.store.uri import filesystem, storage_options
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

    existing = latest_checkpoint(out)
    if existing and not config.resume:
        raise UserError(f"{out!r} already has checkpoints (latest step {existing[1]['step']}): "
                        "pass --resume to continue, or choose a new --out")
    if config.resume and existing:
        _check_resume(existing[1], preset, config)
    elif config.resume:
        logger.warning("--resume: no checkpoint under %s/checkpoints, starting from scratch", out)

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

    ensure_ray(dashboard=True)  # Ray Train's cleaner needs the State API
    for uri, what in ((ref.uri, "the latent table (--data)"), (out, "the run folder (--out)"),
                      (enc_meta["vae"], "the VAE the latent table was encoded with")):
        require_shared(uri, what)

    write_json(artifact_uri(out, "config.json"), {"preset": preset.to_dict(), "run": dataclasses.asdict(config),
                                                  "latent_table": f"{ref.uri}@{latent_version}"})
    fs, storage = filesystem(artifact_uri(out, "checkpoints"))
    run_name = time.strftime("run-%Y%m%d-%H%M%S")
    env = {k: v for k, v in {**storage_options(), "DS_ACCELERATOR": "cuda" if config.use_gpu else "cpu"}.items()}
    run = WorkerConfig(
        preset=preset.to_dict(), latent_uri=ref.uri, latent_version=latent_version, zero_stage=config.zero_stage,
        use_gpu=config.use_gpu, threads=config.threads_per_worker, empty_emb=empty_caption(ref.uri).tolist(),
        out=out, vae=enc_meta["vae"], run_name=run_name,
        resume_from=existing[0] if (config.resume and existing) else None, crash_at_step=config.crash_at_step,
        shuffle_buffer=config.shuffle_buffer, speed=config.speed,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"run": run},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    raise_worker_error(out)
    final = latest_checkpoint(out)
    if final is None:
        raise RuntimeError(f"training ended without a checkpoint under {out}/checkpoints")
    card = {
        "kind": "emoji-ldm model", "preset": preset.name, "config": preset.to_dict(),
        "dataset": encoded_dataset(enc_meta), "dataset_version": enc_meta.get("dataset_version"),
        "latent_table": ref.uri, "latent_table_version": latent_version, "vae": enc_meta["vae"],
        "text_encoder": preset.text.pretrained, "code_version": code_version(),
        "training": {"workers": config.workers, "zero_stage": config.zero_stage, "steps": final[1]["step"],
                     "global_batch": preset.train.batch_size},
        "metrics": result.metrics,
    }
    card = export_model(final[0], preset, enc_meta["vae"], artifact_uri(out, "model"), card)
    return {**card, "out": out}



_WORKER_ERROR = ("_emoji_ldm", "worker-error.txt")


def raise_worker_error(out: str) -> None:
    """The UserError a worker left in the run folder (see `train_loop`), raised here, once."""
    from emoji_ldm.store.artifacts import artifact_uri, delete, exists, read_bytes

    uri = artifact_uri(out, *_WORKER_ERROR)
    if exists(uri):
        message = read_bytes(uri).decode()
        delete(uri)
        raise UserError(message)


def report(card: dict) -> str:
    loss = card["metrics"].get("loss")
    out = card["out"].rstrip("/")
    return (f"train: {card['training']['steps']} steps, final loss {loss if loss is None else round(loss, 4)} -> "
            f"model {out}/model, samples {out}/samples")
