"""`make gpu-train`: one short training run on one GPU, at the hardware's limit, then a gallery, a naming sheet and
an eval, without Ray (the GPU machine has none), through the project's own step, EMA and sampler.

    python gpu_check/train.py --device cuda [--minutes 8] [--out $OUT]   # on the GPU machine: docs/gpu.md
    python gpu_check/train.py --device cpu                                # here: the same path, smaller

Data: `gpu_check/bundle.py`'s folder (`make gpu-train-bundle`): the emoji as uint8 RGBA, their caption variants and
MiniLM. The images live on the device as one uint8 tensor; a batch is gathered, scaled and patched there, and its
text is a row gather from the captions' MiniLM states, encoded once at start: the loader never touches the host.

The preset: `--preset auto` takes the largest VAE-free candidate whose FLOPs per image (counted by torch) let the
budget reach `MIN_EPOCHS` of the bundle at `ASSUMED_MFU` of the bf16 matmul peak measured at start. The step is
the training loop's (`emoji_ldm.train.loop.one_process`, `Loop.step`) on a `PlainEngine` (bf16 autocast over fp32
weights, fused AdamW, the UNet torch.compiled), with the loop's fp32 EMA; nothing in the loop reads a device value
(losses stay in a device buffer read once at the end), and the LR schedule's length is set from the step time
measured after compiling.

Outputs (`--out`, default $OUT or gpu-train-out): gallery.png, naming-sheet.png, naming-options.json (no answers),
naming-key.json, eval.json, record.json (images/s, MFU, the profiler's GPU busy share, loader images/s, minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # emoji_ldm from the working tree (not installed on the GPU machine)

from emoji_ldm.errors import UserError  # noqa: E402
from emoji_ldm.models.presets import get_preset  # noqa: E402
from emoji_ldm.train.metrics import busy_share  # noqa: E402
from gpu_check.bundle import GpuLoader, caption_table, load_data, loader_rate, sync  # noqa: E402
from gpu_check.gallery import evaluate, export, sheets  # noqa: E402

# Pixel space as `pixel32` trains it, its noise section as `--set`s: the clean image predicted, under DDPM's linear
# betas (SD's scaled-linear ones are for latents: on pixels they drew speckle, bench/archive/demo_forms/README.md)
PIXEL_NOISE = {f"noise.{k}": str(v) for k, v in asdict(get_preset("pixel32").noise).items()}
# VAE-free candidates, largest first: (preset, overrides as `--set` takes them, lr, warm-up steps)
CANDIDATES = {
    "emoji64-pixels": ("emoji64", {"vae.kind": "patches", "vae.pretrained": "none", "vae.patch_size": "8",
                                   "vae.latent_channels": "256", "vae.scaling_factor": "none", **PIXEL_NOISE},
                       4e-4, 200),
    "small64-pixels": ("small64", {"vae.kind": "patches", "vae.patch_size": "4", "vae.latent_channels": "64",
                                   **PIXEL_NOISE}, 1e-3, 200),
    "pixel32": ("pixel32", {}, 2e-3, 50),
}
MIN_EPOCHS = 300  # the seeds trained their model 300 epochs
ASSUMED_MFU = 0.4  # what --preset auto plans with: the target


@dataclass(frozen=True)
class RunConfig:
    device: str = "cuda"
    bundle: Path = Path("gpu-train-bundle")
    out: Path = Path("gpu-train-out")
    minutes: float = 8.0  # training budget, compile included
    wall_s: float = 570.0  # the whole script's limit (a device call runs at most 600 s): training ends early to fit
    preset: str = "auto"
    overrides: dict = field(default_factory=dict)
    batch: int = 2048
    max_steps: int | None = None
    rows: int | None = None  # training rows kept (fewer captions to encode on a CPU)
    compile: bool = True
    phases: tuple[int, int, int] = (3, 20, 10)  # steps: warm-up (compiles), calibration, profiled
    sample_steps: int = 25
    seeds: int = 4  # gallery seeds per prompt
    eval_seeds: int = 4
    eval_prompts: int | None = None
    minilm: Path | None = None  # default: BUNDLE/minilm

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise UserError(f"--device must be cuda or cpu, got {self.device!r}")
        if self.preset != "auto" and self.preset not in CANDIDATES:
            raise UserError(f"--preset must be auto or one of {', '.join(CANDIDATES)}, got {self.preset!r}")
        for name in ("minutes", "batch", "sample_steps", "seeds", "eval_seeds"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.bundle / "data" / "images.npz").is_file():
            raise UserError(f"no bundle at {self.bundle} (data/images.npz): build it with `make gpu-train-bundle`, "
                            "and carry it to the GPU machine as docs/gpu.md says")
        if not (self.text_folder / "config.json").is_file():
            raise UserError(f"no MiniLM at {self.text_folder}: carry the bundle's minilm/ (docs/gpu.md, first call)")

    @property
    def text_folder(self) -> Path:
        return self.minilm or self.bundle / "minilm"

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def candidate(name: str, config: RunConfig, max_steps: int | None = None):
    """The candidate's preset with MiniLM from the bundle, the run's batch, LR and (once known) length."""
    base, overrides, lr, warmup = CANDIDATES[name]
    recipe = {"text.pretrained": str(config.text_folder), "text.kind": "bert", "text.max_length": "16",
              "text.hidden_size": "none", "train.batch_size": str(config.batch), "train.lr": str(lr),
              "train.min_lr": str(lr / 10), "train.warmup_steps": str(warmup), "train.caption_dropout": "0.1",
              "train.ema_decay": "0.9995", "train.ema_warmup": "true",
              "train.max_steps": str(max_steps or max(warmup + 1, config.max_steps or 100_000))}
    return get_preset(base, {**overrides, **recipe, **config.overrides})


def flops_per_image(preset, device, empty) -> float:
    """Forward + backward FLOPs of one image through the preset's UNet (torch's counter, batch 2, eager)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from emoji_ldm.models.builders import build_unet, noise_scheduler
    from emoji_ldm.train.step import micro_batch_loss

    unet = build_unet(preset).to(device).train()
    c, s = preset.vae.latent_channels, preset.latent_size
    latents = torch.randn(2, c, s, s, device=device)  # (2, C, h, w)
    text = empty.expand(2, *empty.shape)  # (2, L, D)
    with FlopCounterMode(display=False) as counter:
        micro_batch_loss(unet, noise_scheduler(preset), latents, text, empty, preset.train,
                         preset.noise.prediction_type, torch.float32).backward()
    return counter.get_total_flops() / 2


def choose(config: RunConfig, peak: float, rows: int, device, empty) -> tuple[str, dict]:
    """The largest candidate that reaches MIN_EPOCHS in the budget at ASSUMED_MFU (else the smallest)."""
    names = list(CANDIDATES) if config.preset == "auto" else [config.preset]
    plans = {}
    for name in names:
        fpi = flops_per_image(candidate(name, config), device, empty)
        images = peak * ASSUMED_MFU * config.minutes * 60 / fpi
        plans[name] = {"flops_per_image": fpi, "planned_images": images, "planned_epochs": images / rows}
    fits = [n for n in names if plans[n]["planned_epochs"] >= MIN_EPOCHS]
    return (fits[0] if fits else names[-1]), plans


def build_engine(preset, config: RunConfig, device):
    import torch

    from emoji_ldm.models.builders import build_unet, configure_trainable
    from emoji_ldm.train.lr import preset_schedule
    from emoji_ldm.train.speed import SpeedOptions, compile_engine, prepare_unet
    from emoji_ldm.train.step import PlainEngine

    speed = SpeedOptions(precision="bf16" if config.cuda else "no", channels_last=config.cuda, compile=config.compile)
    torch.manual_seed(preset.train.seed)
    unet = prepare_unet(build_unet(preset).to(device).train(), speed)
    params = configure_trainable(unet, preset)
    optimizer = torch.optim.AdamW(params, lr=preset.train.lr, weight_decay=preset.train.weight_decay,
                                  fused=config.cuda)
    engine = PlainEngine(unet, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, preset_schedule(preset)),
                         preset.train.grad_clip, params)
    compile_engine(engine, speed)
    return engine, params, speed


def trainer(engine, params, preset, config: RunConfig, device, empty):
    """The training loop of one process over `engine`, with its fp32 EMA of the trained weights (`.ema`)."""

    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.train.loop import one_process
    from emoji_ldm.train.step import latent_forward

    forward = latent_forward(engine, noise_scheduler(preset), empty, preset.train, preset.noise.prediction_type)
    return one_process(engine, params, forward, micro=config.batch, device=device,
                       precision="bf16" if config.cuda else "no", ema=preset.train)


def retime(engine, preset) -> None:
    """The LR schedule over the run's real length (known once a step is timed), from the step it has reached."""
    import torch

    from emoji_ldm.train.lr import preset_schedule

    done = engine.lr_scheduler.last_epoch
    engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, preset_schedule(preset),
                                                            last_epoch=done - 1)


def train(config: RunConfig, name: str, loop, loader, device, deadline: float) -> dict:
    import torch

    engine, losses = loop.recipe.engine, torch.zeros(1 << 17, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.cuda)
    count = [0]

    def step() -> None:
        with autocast:
            loss = loop.step(loader())  # the EMA follows
        losses[count[0] % len(losses)] = loss  # a device copy, read once at the end
        count[0] += 1

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        return time.perf_counter() - start

    warm, calibrate, profiled = config.phases
    started = time.perf_counter()
    compile_s = run(warm)
    step_s = run(calibrate) / max(1, calibrate)
    total = count[0] + max(1, int((deadline - time.perf_counter()) / max(step_s, 1e-6)))
    total = min(total, config.max_steps or total)
    retime(engine, candidate(name, config, max_steps=total))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if config.cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        profile_s = run(min(profiled, max(0, total - count[0])))
    timed_from, start, last_print = count[0], time.perf_counter(), time.perf_counter()
    while count[0] < total and time.perf_counter() < deadline:
        step()
        if time.perf_counter() - last_print > 30:
            last_print = time.perf_counter()
            print(f"gpu-train: step {count[0]}/{total}, {last_print - started:.0f} s", file=sys.stderr, flush=True)
    sync(device)
    timed_s, timed = time.perf_counter() - start, count[0] - timed_from
    seen = losses[:min(count[0], len(losses))].cpu().numpy()
    return {"steps": count[0], "planned_steps": total, "compile_s": compile_s, "calibrated_step_s": step_s,
            "timed_steps": timed, "timed_s": timed_s, "minutes_trained": (time.perf_counter() - started) / 60,
            "gpu_busy_share": busy_share(prof, profile_s) if config.cuda else None, "profiled_s": profile_s,
            "loss_first": float(seen[:50].mean()), "loss_last": float(seen[-50:].mean()), "epochs": loader.epochs}


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared)"


def log(began: float, message: str) -> None:
    print(f"gpu-train [{time.perf_counter() - began:5.0f} s] {message}", file=sys.stderr, flush=True)


def write(config: RunConfig, name: str, payload: dict) -> None:
    (config.out / name).write_text(json.dumps(payload, indent=2, default=str))


def run(config: RunConfig) -> dict:
    import torch

    from emoji_ldm.train.check import matmul_peak

    began = time.perf_counter()
    device = torch.device(config.device)
    config.out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(device, torch.bfloat16 if config.cuda else torch.float32)  # the step's matmul dtype
    log(began, f"matmul peak {peak / 1e12:.3g} TFLOP/s")
    data = load_data(config.bundle, config.rows, device)
    table = caption_table(candidate("pixel32", config), data.meta["used_captions"], device)  # (U, L, D)
    empty = table[0]  # the empty caption
    log(began, f"{len(data.train)} training rows, {len(table)} captions encoded")
    name, plans = choose(config, peak, len(data.train), device, empty)
    preset = candidate(name, config)
    engine, params, speed = build_engine(preset, config, device)
    loop = trainer(engine, params, preset, config, device, empty)
    log(began, f"preset {name}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters")
    from emoji_ldm.models.builders import build_vae
    from emoji_ldm.train.speed import batch_layout

    loader = GpuLoader(data, table, build_vae(preset).to(device), config.batch, device, batch_layout(speed))
    loader_ips = loader_rate(loader, device)
    log(began, f"loader alone: {loader_ips:.0f} images/s")
    deadline = min(time.perf_counter() + config.minutes * 60, began + config.wall_s - (75 if config.cuda else 90))
    record = {"device": device_name(device), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "torch": torch.__version__, "preset": name, "base_preset": CANDIDATES[name][0], "plans": plans,
              "params": sum(p.numel() for p in params), "batch": config.batch, "rows_trained": len(data.train),
              "styles": data.meta["styles"], "captions_encoded": len(table), "peak_tflops_measured": peak / 1e12,
              "loader_images_per_s": loader_ips, "config": asdict(config)}
    fig = train(config, name, loop, loader, device, deadline)
    fpi = plans[name]["flops_per_image"]
    ips = fig["timed_steps"] * config.batch / fig["timed_s"] if fig["timed_steps"] else None
    record.update(fig, images_per_s=ips, flops_per_image=fpi, mfu=ips * fpi / peak if ips else None,
                  achieved_tflops=ips * fpi / 1e12 if ips else None,
                  loader_over_training=loader_ips / ips if ips else None)
    write(config, "record.json", record)  # the training figures, before anything after them can fail
    log(began, summary({**record, "seconds_total": time.perf_counter() - began}))
    ema = loop.ema.gathered()  # on the CPU
    del engine, loop, loader
    with tempfile.TemporaryDirectory(prefix="gpu-train-model-") as folder:  # 0.3 GB: not brought back
        sampler = export(preset, ema, Path(folder), device)
        record["sheets"] = sheets(sampler, data.meta, config)
        log(began, "gallery and naming sheet drawn")
        result = evaluate(sampler, data, config)
    write(config, "eval.json", result)
    record.update(eval=result, seconds_total=time.perf_counter() - began)
    write(config, "record.json", record)
    return record


def parse(argv: list[str] | None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--bundle", default="gpu-train-bundle")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-train-out")
    p.add_argument("--minilm", default=None, help="the MiniLM folder (default: BUNDLE/minilm)")
    p.add_argument("--minutes", type=float, help="training budget (default 8 on cuda, 3 on cpu)")
    p.add_argument("--wall-s", type=float, help="the whole run's limit in seconds (default 570 on cuda, 600 on cpu)")
    p.add_argument("--preset", default="auto", help=f"auto | {' | '.join(CANDIDATES)}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="preset override")
    p.add_argument("--batch", type=int, help="images per step (default 2048 on cuda, 16 on cpu)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--rows", type=int, help="training rows kept (default all on cuda, 1000 on cpu)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--eval-seeds", type=int)
    p.add_argument("--eval-prompts", type=int)
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    pick = (lambda value, gpu, cpu: value if value is not None else (gpu if cuda else cpu))
    overrides = dict(item.split("=", 1) for item in a.set)
    return RunConfig(a.device, Path(a.bundle), Path(a.out), pick(a.minutes, 8.0, 3.0), pick(a.wall_s, 570.0, 600.0),
                     a.preset, overrides, pick(a.batch, 2048, 16), a.max_steps, pick(a.rows, None, 1000),
                     cuda and not a.no_compile, (3, 20, 10) if cuda else (1, 3, 3), pick(a.sample_steps, 25, 10),
                     a.seeds, pick(a.eval_seeds, 4, 1), pick(a.eval_prompts, None, 16),
                     Path(a.minilm) if a.minilm else None)


def summary(r: dict) -> str:
    def f(key, scale=1.0, fmt=".3g"):
        return "n/a" if r.get(key) is None else format(r[key] * scale, fmt)

    return (f"gpu-train on {r['device']}: {r['preset']} ({r['params'] / 1e6:.1f}M), batch {r['batch']}, "
            f"{r['steps']} steps ({r['epochs']} epochs of {r['rows_trained']} rows) in {r['minutes_trained']:.2f} min; "
            f"{f('images_per_s')} images/s, MFU {f('mfu', 100)}% of {r['peak_tflops_measured']:.3g} TFLOP/s, "
            f"GPU busy {f('gpu_busy_share', 100)}%, loader {f('loader_over_training')}x training; "
            f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}; {r['seconds_total']:.0f} s in all")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = parse(argv)
        if not config.cuda:  # OpenMP threads that spin while they wait starve each other on a shared, loaded CPU
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        if config.cuda and not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA device: use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # one batch shape all run: cuDNN times its convolution algorithms once
        record = run(config)
    except UserError as e:
        print(f"gpu-train: error: {e}", file=sys.stderr)
        return 2
    print(summary(record))
    print(record["eval"].get("summary") or record["eval"].get("skipped"))
    print(f"outputs: {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
