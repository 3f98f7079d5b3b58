"""`emoji-ldm train-step-check`: the real training step on random latents, in one process, no Ray.

It builds the preset's UNet, runs the training loop's step (`loop.Loop.step`,
the one the Ray Train workers run) on random latents and text embeddings of the preset's shapes,
and reports images/s, the FLOPs of a step (counted by torch), MFU against a
matmul peak measured on the same device, and peak memory. It is the check to
run on a GPU node (only torch, transformers and diffusers are needed) and a
smoke test for users, like `accelerate launch` in a single process.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import PresetOptions
from emoji_ldm.train.speed import SpeedOptions


@dataclass(frozen=True)
class StepCheckConfig(PresetOptions):
    steps: int = opt(10, help="timed training steps")
    warmup: int = opt(2, help="untimed steps first (allocator, kernels)")
    batch_size: int | None = opt(None, help="images per step (default: the preset's global batch)")
    threads: int | None = opt(None, help="CPU threads for torch (default: torch's)")
    speed: SpeedOptions = opt(default_factory=SpeedOptions, help="the fast-path options (as train's)")
    sample_batch: int = opt(16, help="images per sampler call for the sampling check (0: skip it)")
    sample_steps: int = opt(25, help="DPM-Solver++ steps of the sampling check")

    def __post_init__(self):
        for name in ("steps", "batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be 1 or more, got {value}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.sample_batch < 0 or self.sample_steps < 1:
            raise UserError(f"--sample-batch must be 0 or more and --sample-steps 1 or more, got "
                            f"{self.sample_batch} and {self.sample_steps}")


def matmul_peak(device, dtype, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul on `device` in `dtype`: the peak MFU is measured against."""
    import torch

    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak resident memory


def step_check(config: StepCheckConfig) -> dict:
    """Run the check; returns the figures (see `report`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from emoji_ldm.models.builders import count_params
    from emoji_ldm.train.speed import compile_engine, torch_dtype

    if config.use_gpu and not torch.cuda.is_available():
        raise UserError("--gpu: torch sees no CUDA device here; run without --gpu to check the CPU")
    precision = config.speed.resolved_precision(config.use_gpu)
    if config.threads:
        torch.set_num_threads(config.threads)
    preset = config.preset_config()
    device = torch.device("cuda" if config.use_gpu else "cpu")
    # the weights stay fp32 and the step runs under autocast (CPU autocast does bf16 too); fp16 adds loss scaling
    half = precision != "no"
    autocast = torch.autocast(device.type, dtype=torch_dtype(precision), enabled=half)
    engine, step = _step(config, preset, device, precision, autocast)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()  # forward + backward of one step, counted eagerly
    compile_engine(engine, config.speed)
    warmup_s, _ = _timed(step, config.warmup, device)  # with --compile the first one compiles
    seconds, loss = _timed(step, config.steps, device)
    # the peak of the step's matmul dtype; on CPUs without bf16 units that is below fp32's, so the faster counts
    peak = max(matmul_peak(device, torch_dtype(precision)), matmul_peak(device, torch.float32) if half else 0.0)
    achieved = flops * config.steps / seconds
    sampling = sample_check(engine.module, preset, config, device, autocast, torch_dtype(precision)) \
        if config.sample_batch else None
    batch = config.batch_size or preset.train.batch_size
    return {
        "sampling": sampling,
        "preset": preset.name, "device": torch.cuda.get_device_name(device) if config.use_gpu else "cpu",
        "precision": f"{precision} autocast" if half else "fp32", "speed": config.speed.summary(config.use_gpu),
        "warmup_s": warmup_s, "batch": batch, "steps": config.steps,
        "params": count_params(engine.module), "step_s": seconds / config.steps,
        "images_per_s": batch * config.steps / seconds,
        "flops_per_step": flops, "achieved_flops": achieved, "peak_flops": peak, "mfu": achieved / peak,
        "peak_memory_bytes": _peak_memory_bytes(device), "loss": float(loss),
        "config": dataclasses.asdict(config),
    }


def _step(config: StepCheckConfig, preset, device, precision: str, autocast):
    """The preset's UNet in a `PlainEngine` on `device`, and a function that runs one real training step of it (the
    loop's, `loop.Loop.step`) on random latents and text embeddings of the preset's shapes (returns its loss)."""
    import torch

    from emoji_ldm.models.builders import build_unet, configure_trainable, noise_scheduler, text_hidden_size
    from emoji_ldm.train import loop, runner
    from emoji_ldm.train.lr import preset_schedule
    from emoji_ldm.train.speed import prepare_unet
    from emoji_ldm.train.step import PlainEngine, latent_forward

    torch.manual_seed(preset.train.seed)
    unet = prepare_unet(build_unet(preset).to(device).train(), config.speed)
    params = configure_trainable(unet, preset)
    optimizer = runner.adamw(params, lr=preset.train.lr, weight_decay=preset.train.weight_decay,
                             adam_beta2=preset.train.adam_beta2)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    engine = PlainEngine(unet, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, preset_schedule(preset)),
                         preset.train.grad_clip, params, scaler=scaler)
    noise = noise_scheduler(preset)
    batch = config.batch_size or preset.train.batch_size
    c, s = preset.vae.latent_channels, preset.latent_size
    length, width = preset.text.max_length, text_hidden_size(preset)
    latents = torch.randn(batch, c, s, s, device=device)  # (B, C, h, w)
    text = torch.randn(batch, length, width, device=device)  # (B, L, D)
    empty = torch.zeros(length, width, device=device)  # (L, D)

    forward = latent_forward(engine, noise, empty, preset.train, preset.noise.prediction_type)
    trainer = loop.one_process(engine, params, forward, micro=batch, device=device)

    def step():
        with autocast:
            return trainer.step((latents, text))

    return engine, step


def _timed(step, n: int, device) -> tuple[float, object]:
    """Seconds of `n` calls of `step` (synchronised on a GPU), and the last call's result."""
    _sync(device)
    start = time.perf_counter()
    result = None
    for _ in range(n):
        result = step()
    _sync(device)
    return time.perf_counter() - start, result


def sample_check(unet, preset, config: StepCheckConfig, device, autocast, dtype) -> dict:
    """The sampler's denoising loop (DPM-Solver++ with classifier-free guidance, as `generate` runs it) on the
    same UNet: images/s at `--sample-batch`. Random text embeddings and no VAE decode (the UNet is nearly all
    of a sample's time at emoji sizes), so it needs no weights."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from emoji_ldm.models.builders import noise_scheduler, text_hidden_size

    sched = DPMSolverMultistepScheduler.from_config(noise_scheduler(preset).config, algorithm_type="dpmsolver++")
    b, c, s = config.sample_batch, preset.vae.latent_channels, preset.latent_size
    text = torch.randn(2 * b, preset.text.max_length, text_hidden_size(preset), device=device)  # (2B, L, D)
    unet.eval()

    def run() -> None:
        sched.set_timesteps(config.sample_steps, device=device)
        latents = torch.randn(b, c, s, s, device=device) * sched.init_noise_sigma  # (B, C, h, w)
        with torch.no_grad(), autocast:
            for t in sched.timesteps:
                pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
                uncond, cond = pred.float().chunk(2)
                latents = sched.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample

    start = time.perf_counter()
    run()  # warm-up (compiles when --compile)
    _sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    run()
    _sync(device)
    seconds = time.perf_counter() - start
    unet.train()
    return {"batch": b, "steps": config.sample_steps, "seconds": seconds, "images_per_s": b / seconds,
            "warmup_s": warmup, "dtype": str(dtype).removeprefix("torch.")}


def report(r: dict) -> str:
    sampling = r.get("sampling")
    tail = "" if not sampling else (
        f"; sampler (DPM-Solver++ {sampling['steps']} steps, guidance, batch {sampling['batch']}): "
        f"{sampling['images_per_s']:.2f} images/s (first call {sampling['warmup_s']:.1f} s)")
    return (f"train-step-check: preset {r['preset']} on {r['device']} ({r['speed']}), UNet "
            f"{r['params'] / 1e6:.1f}M params, batch {r['batch']}: {r['step_s'] * 1000:.0f} ms/step, "
            f"{r['images_per_s']:.1f} images/s, {r['flops_per_step'] / 1e9:.1f} GFLOP/step, "
            f"{r['achieved_flops'] / 1e12:.3f} TFLOP/s = MFU {100 * r['mfu']:.1f}% of a measured "
            f"{r['peak_flops'] / 1e12:.2f} TFLOP/s matmul peak, peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB, "
            f"loss {r['loss']:.4f}{tail}")
