"""The training harness every recipe plugs into: the driver's side and the worker's set-up.

Driver:
- `refuse_or_resume`: an --out that already has checkpoints is refused without --resume; with it, the recipe
  checks the checkpoint matches what it is about to train;
- `fit`: the `TorchTrainer` (gloo on CPU, nccl on GPUs), the run's storage beside OUT, the workers' environment
  (S3 settings, DeepSpeed's accelerator), failure handling, and the one-line report of a worker's `UserError`.

Worker:
- `run_worker`: runs the recipe's worker function; a `UserError` on any rank (a mistake a restart cannot fix)
  is left in the run folder for the driver, and the rank fails, so Ray Train stops every rank at once instead
  of leaving the others in their next collective until the timeout. A restarted attempt that finds the error
  returns at once.
- `setup_worker`: threads, seed, device (the one place that picks it), precision;
- `create_engine`: the DeepSpeed engine over the recipe's module, optimizer and schedule, compiled on request.

The loop every recipe runs in (accumulation, skipped steps, EMA, logging, checkpoints) is `loop.py`; the recipes
(`ldm.py`, `dreambooth.py`, `vae.py`) hold only their model, data, loss and export.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from emoji_ldm.errors import UserError

logger = logging.getLogger(__name__)

_WORKER_ERROR = ("_emoji_ldm", "worker-error.txt")


class WorkerUserError(RuntimeError):
    """Raised by a rank after it has left a `UserError` for the driver: fails the worker group at once."""


# --- driver ------------------------------------------------------------------------------------------------


def refuse_or_resume(out: str, resume: bool, check=None, *, use_gpu: bool, precision: str) -> None:
    """Refuse a run into an OUT that has checkpoints unless it resumes; `check(state)` raises a `UserError` when
    the checkpoint's `state.json` does not match the run about to start, as does another device or precision
    (the RNG state of a CPU run has no CUDA part; the optimizer state differs between fp32 and bf16). The
    workers then restore the newest checkpoint under OUT/checkpoints (`checkpoint.restore`)."""
    from emoji_ldm.train import checkpoint

    existing = checkpoint.latest(out)
    if existing and not resume:
        raise UserError(f"{out!r} already has checkpoints (latest step {existing[1]['step']}): pass --resume to "
                        "continue, or choose a new --out")
    if resume and not existing:
        logger.warning("--resume: no checkpoint under %s/checkpoints, starting from scratch", out)
    if existing:
        check_saved(existing[1], {"device": "cuda" if use_gpu else "cpu", "precision": precision}, out)
    if existing and check is not None:
        check(existing[1])


def check_saved(state: dict, now: dict, out: str) -> None:
    """A `UserError` naming every setting in `now` that the checkpoint's `state` recorded differently."""
    diffs = [k for k, v in now.items() if state.get(k) != v]
    if diffs:
        raise UserError(f"--resume: the checkpoint under {out!r} was written with other {', '.join(diffs)} ("
                        + ", ".join(f"{k} {state.get(k)!r}" for k in diffs) + "); resume with the same settings, "
                        "or train into a new --out")


def fit(worker, run, *, name: str, out: str, workers: int, use_gpu: bool, max_failures: int,
        datasets: dict | None = None):
    """Run `worker(run)` on `workers` Ray Train workers; returns the `ray.train.Result`.

    `run` is the recipe's frozen dataclass: everything a worker needs, passed explicitly. Checkpoints go to
    OUT/checkpoints (where `checkpoint.latest` and `checkpoint.restore` look) through the project's filesystem,
    so S3 settings apply."""
    import time

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.store.artifacts import artifact_uri, delete, exists
    from emoji_ldm.store.uri import filesystem, storage_options

    ensure_ray(dashboard=True)  # Ray Train's cleaner needs the State API
    if exists(artifact_uri(out, *_WORKER_ERROR)):  # left by a driver that was killed before it read it
        delete(artifact_uri(out, *_WORKER_ERROR))
    fs, storage = filesystem(artifact_uri(out, "checkpoints"))
    env = {**storage_options(), "DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"worker": worker, "run": run, "out": out},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=time.strftime(f"{name}-%Y%m%d-%H%M%S"), storage_path=storage, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env},
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except Exception:
        raise_worker_error(out)  # a worker's UserError is the one line the user needs
        raise
    if result.error:
        raise_worker_error(out)
        raise result.error
    raise_worker_error(out)
    return result


def raise_worker_error(out: str) -> None:
    """The `UserError` a worker left in the run folder, raised here once."""
    from emoji_ldm.store.artifacts import artifact_uri, delete, exists, read_bytes

    uri = artifact_uri(out, *_WORKER_ERROR)
    if exists(uri):
        message = read_bytes(uri).decode()
        delete(uri)
        raise UserError(message)


# --- worker ------------------------------------------------------------------------------------------------


def _train_loop(loop_config: dict) -> None:
    run_worker(loop_config["worker"], loop_config["run"], loop_config["out"])


def run_worker(worker, run, out: str) -> None:
    """`worker(run)` in a Ray Train worker, with the `UserError` path described in the module docstring."""
    from emoji_ldm.store.artifacts import artifact_uri, exists, write_bytes

    error = artifact_uri(out, *_WORKER_ERROR)
    if exists(error):  # a restart after a UserError: the driver reports it, nothing to retry
        return
    try:
        worker(run)
    except UserError as e:
        write_bytes(error, str(e).splitlines()[0].encode())
        raise WorkerUserError(str(e)) from None


@dataclass(frozen=True)
class Worker:
    """Where this worker runs: its rank, the world size, its device and the precision of the training step."""

    rank: int
    world: int
    device: object  # torch.device
    precision: str  # no | bf16 | fp16
    dtype: object  # torch.dtype the engine runs the module in; batches are cast to it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_worker(use_gpu: bool, threads: int, seed: int, speed) -> Worker:
    """Threads, a seed per rank, and the device: the one place that picks it (model, batches and metrics
    follow it)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import ray.train
    import torch

    from emoji_ldm.train.speed import torch_dtype

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(threads)
    torch.manual_seed(seed * 7919 + rank)
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    precision = speed.resolved_precision(use_gpu)
    return Worker(rank, world, device, precision, torch_dtype(precision))


def no_shared_memory_all_reduce() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce (a C++ op: 25 to 60 s on 2 cores the first time on a
    machine, and again whenever a process with another ninja on its PATH loads it) as it connects the ranks, for
    its inference all-reduce alone; training's collectives go through torch.distributed (gloo). Marked as an op
    this machine cannot build, as DeepSpeed marks one (its `__compatible_ops__`, kept for edits), it is skipped."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(micro: int, grad_accum: int, grad_clip: float, zero_stage: int, precision: str) -> dict:
    """The DeepSpeed config (micro batch per worker, ZeRO stage, precision), without DeepSpeed's defaults that make
    the host wait for the GPU in every step: its throughput timer synchronizes the device twice per micro-step
    (`timers.throughput.synchronized`) to time steps the loop already times, and is turned off; bf16's overflow
    check is in `deepspeed_precision`."""
    from emoji_ldm.train.speed import deepspeed_precision

    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        **deepspeed_precision(precision, zero_stage),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


def adamw(params, *, lr: float, weight_decay: float, adam_beta2: float = 0.999):
    """The AdamW every recipe trains with (betas 0.9, `adam_beta2`): DeepSpeed's engine and `train-step-check`."""
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(0.9, adam_beta2), weight_decay=weight_decay)


def create_engine(module, params, *, lr: float, weight_decay: float, lr_lambda, micro: int, grad_accum: int,
                  grad_clip: float, zero_stage: int, worker: Worker, speed, adam_beta2: float = 0.999):
    """A DeepSpeed engine training `params` of `module` with AdamW (betas 0.9, `adam_beta2`) and a `LambdaLR`
    schedule, channels-last and compiled on request; returns (engine, lr_scheduler)."""
    import deepspeed
    import torch

    from emoji_ldm.train.speed import channels_last_engine, compile_engine

    if worker.device.type == "cpu":
        no_shared_memory_all_reduce()
    optimizer = adamw(params, lr=lr, weight_decay=weight_decay, adam_beta2=adam_beta2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(micro, grad_accum, grad_clip, zero_stage, worker.precision),
        dist_init_required=False,
    )
    channels_last_engine(engine, speed, zero_stage)
    compile_engine(engine, speed)
    return engine, scheduler


def numel(params) -> int:
    """The elements of `params`, whole under ZeRO-3 too: a partitioned parameter's own `numel()` is 0 outside a
    gather, and DeepSpeed keeps its full size in `ds_numel`."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in params)


def step_applied(engine) -> bool:
    """Whether the optimizer step just taken changed the weights: fp16's dynamic loss scaling skips a step
    whose gradients overflowed, and such a step must not advance the step counter, the EMA or the logs."""
    applied = getattr(engine, "was_step_applied", None)
    return True if applied is None else bool(applied())


def mean_over_ranks(values, worker: Worker) -> list[float]:
    """The mean of each of `values` (numbers or one-element tensors) over the ranks (a collective: every rank
    calls it). Device tensors are read once, all together, at the end."""
    import torch

    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=worker.device).reshape(()) for v in values])
    if worker.world > 1 or torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)  # a device tensor: NCCL takes no CPU tensors
    return (t / worker.world).tolist()
