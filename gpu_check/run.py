"""`make gpu-check`: the GPU paths of emoji-ldm in one process, one device, a few minutes, no Ray.

Runs on the GPU check machine (one H100/H200, torch, transformers, accelerate, peft, pyarrow and pandas
installed; diffusers, deepspeed and Pillow from `make gpu-check-wheels`), and with `--device cpu` here. Every
check builds tiny random models of the real classes (nothing is downloaded), runs in its own try/except, and
ends `pass`, `fail` (with the error) or `skip` (with the reason: a package that is not installed). The report
is JSON (`--out`, default gpu-check.json) plus a short table; the exit code is 1 when any check failed.

    python gpu_check/run.py --device cuda            # on the GPU machine (about 3 minutes on an H100)
    python gpu_check/run.py --device cpu [--quick]   # here: the same code paths, smaller sizes

Checks: deepspeed-zero2-bf16, deepspeed-zero3-bf16 (DeepSpeed on one rank: steps, the fp32 EMA, a checkpoint and a
resume), train-step-check (MFU), dreambooth-lora, encode, caption-qwen25vl, pixel32 (the demo's pixel model),
sample-{fp16,bf16}[-compile], generator-set, ray-serve.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # emoji_ldm and tests.tiny_models from the working tree (not installed there)

# datasheet dense peaks (FLOP/s) by dtype, for an MFU against the spec beside the measured matmul peak
DATASHEET_PEAKS = {"H100": {"bf16": 989e12, "fp16": 989e12}, "H200": {"bf16": 989e12, "fp16": 989e12},
                   "A100": {"bf16": 312e12, "fp16": 312e12}}


class Skip(Exception):
    """A check that cannot run here (a package is missing): its reason goes in the report."""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked package counts as missing
        return False


def need(*modules: str) -> None:
    missing = [m for m in modules if not installed(m)]
    if missing:
        raise Skip(f"needs {', '.join(missing)} (not installed here: pip install --no-deps gpu-check-wheels/*.whl)")


@dataclass
class Context:
    device: str  # cuda | cpu
    quick: bool
    work: Path
    cache: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def torch_device(self):
        import torch

        return torch.device(self.device)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def tiny_pipeline(self) -> Path:
        """A tiny SD 1.x-layout pipeline folder with a model card (tests/tiny_models.py), built once."""
        if "pipeline" not in self.cache:
            need("diffusers", "PIL")
            from tests.tiny_models import tiny_model_with_card

            self.cache["pipeline"] = tiny_model_with_card(self.work / "tiny-model")
        return self.cache["pipeline"]


# ---- DeepSpeed ZeRO-2 / ZeRO-3: steps, EMA, checkpoint, resume ------------------------------------------------

def _init_single_rank(ctx: Context) -> None:
    """torch.distributed with one rank: gloo on the CPU, nccl on the GPU (what Ray Train's TorchConfig sets up)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    if ctx.cuda:
        import torch

        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if ctx.cuda else "gloo", rank=0, world_size=1)


def _unet(ctx: Context, seed: int):
    """A small cross-attention UNet2DConditionModel (the tiny preset's layout, narrower on the CPU)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    wide = ctx.cuda and not ctx.quick
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=(64, 128) if wide else (32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)


def _engine(ctx: Context, stage: int, seed: int):
    import torch

    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.lr import preset_schedule
    from emoji_ldm.train.runner import Worker, create_engine
    from emoji_ldm.train.speed import SpeedOptions

    preset = get_preset("tiny", {"text.hidden_size": "32"})
    module = _unet(ctx, seed).to(ctx.torch_device()).train()
    params = [p for p in module.parameters() if p.requires_grad]
    worker = Worker(0, 1, ctx.torch_device(), "bf16", torch.bfloat16)
    engine, _ = create_engine(module, params, lr=1e-3, weight_decay=0.0, lr_lambda=preset_schedule(preset), micro=2,
                              grad_accum=1, grad_clip=1.0, zero_stage=stage, worker=worker,
                              speed=SpeedOptions(precision="bf16"))
    return engine, preset


def _batch(ctx: Context, n: int):
    import torch

    g = torch.Generator("cpu").manual_seed(7)
    latents = torch.randn(n, 4, 8, 8, generator=g).to(ctx.device)  # (B, 4, h, w)
    text = torch.randn(n, 16, 32, generator=g).to(ctx.device)  # (B, L, D)
    return latents, text, torch.zeros(16, 32, device=ctx.device)  # empty caption (L, D)


def _masters(engine) -> list:
    from emoji_ldm.train.ema import master_weights

    return [m.detach().float().cpu().clone() for m in master_weights(list(engine.module.parameters()))]


def deepspeed_check(ctx: Context, stage: int) -> dict:
    need("deepspeed", "diffusers")
    if not ctx.cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    import torch

    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.train.checkpoint import rng_state, set_rng_state
    from emoji_ldm.train.ema import PartitionedEMA
    from emoji_ldm.train.loop import one_process
    from emoji_ldm.train.step import latent_forward, micro_batch_loss

    _init_single_rank(ctx)
    engine, preset = _engine(ctx, stage, seed=0)
    noise = noise_scheduler(preset)
    latents, text, empty = _batch(ctx, 2)
    recipe, ptype = preset.train, preset.noise.prediction_type

    def eval_loss(e) -> float:  # the same noise and timesteps before and after
        state = torch.get_rng_state()
        torch.manual_seed(1234)
        with torch.no_grad():
            loss = float(micro_batch_loss(e, noise, latents, text, empty, recipe, ptype, torch.bfloat16))
        torch.set_rng_state(state)
        return loss

    def trainer(e, ema=None):  # the training loop's step on `e`, with the loop's EMA (this rank's fp32 masters)
        forward = latent_forward(e, noise, empty, recipe, ptype, torch.bfloat16)
        return one_process(e, list(e.module.parameters()), forward, micro=2, device=ctx.torch_device(),
                           precision="bf16", ema=ema)

    original = trainer(engine, ema=preset.train)
    ema = original.ema
    ema_start = [s.clone() for s in ema.gathered().shadow_params]
    before = eval_loss(engine)
    steps = 3 if ctx.quick else 8
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(float(original.step((latents, text))))  # the EMA follows an applied step
    ctx.sync()
    step_s = (time.perf_counter() - start) / steps
    after = eval_loss(engine)
    ema_full = ema.gathered().shadow_params
    ema_moved = max(float((s - s0).abs().max()) for s, s0 in zip(ema_full, ema_start))

    # checkpoint: the engine's shards + the EMA + the RNG, as checkpoint.save writes them (without Ray Train)
    folder = ctx.work / f"ckpt-zero{stage}"
    engine.save_checkpoint(str(folder), tag="ds", client_state={"step": steps})
    torch.save(ema.state_dict(), folder / "ema.pt")
    torch.save(rng_state(ctx.torch_device()), folder / "rng-rank0.pt")
    saved = _masters(engine)

    # resume into a fresh engine built from other random weights
    resumed, _ = _engine(ctx, stage, seed=1)
    _, client = resumed.load_checkpoint(str(folder), tag="ds", load_lr_scheduler_states=True)
    ema2 = PartitionedEMA(resumed, list(resumed.module.parameters()), preset.train, rank=0)
    ema2.load_state_dict(torch.load(folder / "ema.pt", weights_only=False, map_location="cpu"))
    loaded = _masters(resumed)
    weights_equal = all(torch.equal(a, b) for a, b in zip(saved, loaded)) and len(saved) == len(loaded)
    ema_equal = all(torch.equal(a, b) for a, b in zip(ema_full, ema2.gathered().shadow_params))
    lr_equal = resumed.lr_scheduler.get_last_lr() == engine.lr_scheduler.get_last_lr()

    # one more step from the same RNG on both: a resumed run continues where the first left off
    rng = torch.load(folder / "rng-rank0.pt", weights_only=False, map_location="cpu")
    set_rng_state(rng, ctx.torch_device())
    next_a = float(original.step((latents, text)))
    set_rng_state(rng, ctx.torch_device())
    next_b = float(trainer(resumed).step((latents, text)))
    figures = {"zero_stage": stage, "steps": steps, "step_ms": 1000 * step_s, "loss_before": before,
               "loss_after": after, "loss_decreased": after < before, "train_losses": losses,
               "ema_moved_max_abs": ema_moved, "ema_steps": ema.optimization_step,
               "checkpoint_step": client.get("step"), "checkpoint_weights_equal": weights_equal,
               "checkpoint_ema_equal": ema_equal, "checkpoint_lr_equal": lr_equal,
               "next_loss_original": next_a, "next_loss_resumed": next_b,
               "params": sum(m.numel() for m in saved)}
    del engine, resumed
    gc.collect()
    problems = [name for name, ok in [
        ("a training loss is not finite", all(math.isfinite(x) for x in losses + [before, after])),
        ("the EMA did not move", ema_moved > 0),
        ("the resumed fp32 masters differ from the saved ones", weights_equal),
        ("the resumed EMA differs", ema_equal),
        ("the resumed LR schedule differs", lr_equal),
        ("the checkpoint's client state lost the step", client.get("step") == steps),
        ("the step after resume differs from the original run's", math.isclose(next_a, next_b, rel_tol=2e-2,
                                                                                abs_tol=1e-3)),
    ] if not ok]
    if problems:
        raise AssertionError("; ".join(problems) + f" (figures: {figures})")
    return figures


# ---- train-step-check MFU ------------------------------------------------------------------------------------

def step_check(ctx: Context) -> dict:
    need("diffusers")
    import torch

    from emoji_ldm.train.check import StepCheckConfig, step_check
    from emoji_ldm.train.speed import SpeedOptions

    if ctx.cuda and not ctx.quick:  # the seed's 71M UNet (emoji64) at its batch: a meaningful MFU on an H100
        config = StepCheckConfig(preset="emoji64", use_gpu=True, steps=10, warmup=3, batch_size=128,
                                 sample_batch=0, speed=SpeedOptions(precision="bf16"))
    else:
        config = StepCheckConfig(preset="tiny", overrides={"text.hidden_size": "384"}, use_gpu=ctx.cuda,
                                 steps=2 if ctx.quick else 5, warmup=1, batch_size=4 if ctx.quick else 16,
                                 sample_batch=0, speed=SpeedOptions(precision="bf16" if ctx.cuda else "no"))
    r = step_check(config)
    figures = {"preset": r["preset"], "device": r["device"], "precision": r["precision"], "batch": r["batch"],
               "params": r["params"], "step_ms": 1000 * r["step_s"], "images_per_s": r["images_per_s"],
               "flops_per_step": r["flops_per_step"], "achieved_tflops": r["achieved_flops"] / 1e12,
               "measured_peak_tflops": r["peak_flops"] / 1e12, "mfu_vs_measured": r["mfu"],
               "peak_memory_gib": r["peak_memory_bytes"] / 2**30, "loss": r["loss"]}
    if ctx.cuda:
        name = torch.cuda.get_device_name(0)
        dtype = "bf16" if "bf16" in r["precision"] else None
        for key, peaks in DATASHEET_PEAKS.items():
            if key in name and dtype:
                figures["datasheet_peak_tflops"] = peaks[dtype] / 1e12
                figures["mfu_vs_datasheet"] = r["achieved_flops"] / peaks[dtype]
        figures.setdefault("mfu_vs_datasheet", None)
    else:
        figures["mfu_vs_datasheet"] = None  # no datasheet peak for this CPU: the measured matmul peak only
    if not math.isfinite(r["loss"]):
        raise AssertionError(f"the step's loss is {r['loss']}")
    return figures


# ---- DreamBooth LoRA ----------------------------------------------------------------------------------------

def _plain_loop(ctx: Context, module, params: list, preset, empty, micro: int):
    """The training loop of one process (`loop.one_process`) over a `PlainEngine` of `module`: AdamW at 1e-3, a
    constant LR, the preset's loss with `empty` (L, D) as the dropped caption."""
    import torch

    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.train.loop import one_process
    from emoji_ldm.train.step import PlainEngine, latent_forward

    optimizer = torch.optim.AdamW(params, lr=1e-3)
    engine = PlainEngine(module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), 1.0, params)
    forward = latent_forward(engine, noise_scheduler(preset), empty, preset.train, preset.noise.prediction_type)
    return one_process(engine, params, forward, micro=micro, device=ctx.device)


def dreambooth_lora(ctx: Context) -> dict:
    need("diffusers", "peft")
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from emoji_ldm.inference.sampler import Sampler
    from emoji_ldm.models.builders import configure_trainable
    from emoji_ldm.models.presets import get_preset

    base = ctx.tiny_pipeline()
    preset = get_preset("tiny", {"unet.finetune": "lora", "unet.pretrained": str(base), "text.hidden_size": "32"})
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").to(ctx.device).train()
    params = configure_trainable(unet, preset)  # peft LoRA on the attention projections, the base frozen
    lora = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    g = torch.Generator("cpu").manual_seed(3)
    latents = torch.randn(2, 4, 4, 4, generator=g).to(ctx.device)  # the instance photos' latents (B, 4, h, w)
    text = torch.randn(2, 77, 32, generator=g).to(ctx.device)  # "a sks cat emoji" (B, L, D)
    empty = torch.zeros(77, 32, device=ctx.device)
    autocast = torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=ctx.cuda)
    trainer = _plain_loop(ctx, unet, params, preset, empty, micro=2)
    steps = 3 if ctx.quick else 10
    losses = []
    for _ in range(steps):
        with autocast:
            losses.append(float(trainer.step((latents, text))))
    named = dict(unet.named_parameters())
    changed = sum(not torch.equal(v, named[n].detach()) for n, v in lora.items())
    frozen_same = all(torch.equal(v, named[n].detach()) for n, v in frozen.items())
    # the adapter as `dreambooth --method lora` writes it, loaded by the Sampler and drawn with
    out = ctx.work / "lora"
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet.to("cpu").float())))
    sampler = Sampler.load(str(base), device=ctx.device)
    sampler.load_adapter("sks", str(out))
    from emoji_ldm.inference.sampler import SampleJob

    images = sampler.sample([SampleJob(("a sks cat emoji",), (0,), steps=2, adapter="sks")])[0]
    figures = {"steps": steps, "losses": losses, "lora_tensors": len(lora), "lora_tensors_changed": changed,
               "base_unchanged": frozen_same, "trainable_params": sum(p.numel() for p in params),
               "adapter_file_bytes": (out / "pytorch_lora_weights.safetensors").stat().st_size,
               "adapter_image_size": list(images[0].size)}
    if not all(math.isfinite(x) for x in losses) or changed == 0 or not frozen_same:
        raise AssertionError(f"losses finite, adapter changed, base frozen expected: {figures}")
    return figures


# ---- encode: the frozen VAE + text encoder on a batch ------------------------------------------------------

def encode(ctx: Context) -> dict:
    need("diffusers")
    import torch

    from emoji_ldm.models.builders import build_vae, encode_text, load_text_encoder, vae_scaling_factor
    from emoji_ldm.models.presets import get_preset
    from tests.tiny_models import tiny_clip

    clip = tiny_clip(ctx.work / "clip")
    preset = get_preset("tiny", {"text.pretrained": str(clip), "text.kind": "clip", "text.hidden_size": "32"})
    tokenizer, text_model = load_text_encoder(preset)
    text_model.to(ctx.device)
    torch.manual_seed(0)
    vae = build_vae(preset).to(ctx.device).eval()  # the tiny preset's own RGBA VAE, factor 8
    n = 4 if ctx.quick else 16
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    vae.to(dtype)
    size = preset.image_size
    pixels = torch.rand(n, preset.vae.channels, size, size, device=ctx.device) * 2 - 1  # (B, C, H, W) in [-1, 1]
    start = time.perf_counter()
    with torch.no_grad():
        latents = vae.encode(pixels.to(dtype)).latent_dist.sample() * vae_scaling_factor(vae, preset)  # (B, 4, h, w)
        hidden, mask, truncated = encode_text(tokenizer, text_model, [f"emoji {i}" for i in range(n)],
                                              preset.text.max_length)
    ctx.sync()
    seconds = time.perf_counter() - start
    figures = {"batch": n, "latent_shape": list(latents.shape), "latent_dtype": str(latents.dtype),
               "latents_finite": bool(torch.isfinite(latents.float()).all()), "text_shape": list(hidden.shape),
               "text_finite": bool(torch.isfinite(hidden).all()), "seconds": seconds, "images_per_s": n / seconds}
    expected = [n, preset.vae.latent_channels, preset.latent_size, preset.latent_size]  # own VAE: 1/4 size
    if figures["latent_shape"] != expected or not figures["latents_finite"] or not figures["text_finite"]:
        raise AssertionError(f"latents {expected} and finite expected: {figures}")
    return figures


# ---- pixel32: the demo's pixel-space model (bf16 steps predicting the clean image, fp16/bf16 sampling) ----------

def pixel32(ctx: Context) -> dict:
    need("diffusers", "PIL")
    import torch

    from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler
    from emoji_ldm.models.builders import build_unet, build_vae
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.export import assemble_pipeline
    from tests.tiny_models import tiny_clip

    clip = tiny_clip(ctx.work / "clip-pixel32")
    overrides = {"text.pretrained": str(clip), "text.kind": "clip", "text.hidden_size": "32"}
    if ctx.quick:
        overrides["unet.block_out_channels"] = "32,32"
    preset = get_preset("pixel32", overrides)
    torch.manual_seed(0)
    vae = build_vae(preset).to(ctx.device)  # PatchAutoencoder: no weights, 4x4 patches as channels
    pixels = torch.rand(8, 4, 32, 32, device=ctx.device) * 2 - 1  # (B, 4, 32, 32) RGBA in [-1, 1]
    with torch.no_grad():
        latents = vae.encode(pixels.to(torch.bfloat16)).latent_dist.mode()  # (B, 64, 8, 8) in bf16
        back = vae.decode(latents).sample.float()  # (B, 4, 32, 32)
    round_trip = float((back - pixels.to(torch.bfloat16).float()).abs().max())
    unet = build_unet(preset).to(ctx.device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    g = torch.Generator("cpu").manual_seed(3)
    text = torch.randn(8, preset.text.max_length, 32, generator=g).to(ctx.device)  # (B, L, D)
    empty = torch.zeros(preset.text.max_length, 32, device=ctx.device)
    autocast = torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=ctx.cuda)
    trainer = _plain_loop(ctx, unet, params, preset, empty, micro=8)
    steps = 3 if ctx.quick else 20
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:  # the loop's bf16: autocast over fp32 masters, the target the clean image, min-SNR weighted
            losses.append(float(trainer.step((latents.float(), text))))
    ctx.sync()
    train_s = time.perf_counter() - start
    folder = ctx.work / "pixel32-model"
    assemble_pipeline(unet.to("cpu").float(), preset, "").save_pretrained(folder)  # as train exports it
    sampled = {}
    for dtype in ("fp16", "bf16"):
        sampler = Sampler.load(str(folder), device=ctx.device, options=InferenceOptions(dtype=dtype))
        images = sampler.sample([SampleJob(("red heart", "blue circle"), (0, 1), steps=4)])[0]
        import numpy as np

        arrays = [np.asarray(im) for im in images]
        sampled[dtype] = {"vae": type(sampler.pipe.vae).__name__, "vae_dtype": str(sampler.pipe.vae.dtype),
                          "unet_dtype": str(sampler.pipe.unet.dtype), "size": list(images[0].size),
                          "mode": images[0].mode, "finite_spread": float(np.mean([a.std() for a in arrays]))}
        del sampler
    figures = {"round_trip_max_abs": round_trip, "latent_shape": list(latents.shape), "steps": steps,
               "losses": losses, "train_s": train_s, "prediction_type": preset.noise.prediction_type,
               "sampled": sampled}
    ok = (figures["latent_shape"] == [8, 64, 8, 8] and round_trip < 1e-2 and all(map(math.isfinite, losses))
          and all(s["size"] == [32, 32] and s["mode"] == "RGBA" and s["vae"] == "PatchAutoencoder"
                  for s in sampled.values()))
    if not ok:
        raise AssertionError(f"exact patches, finite losses and 32x32 RGBA from fp16 and bf16 expected: {figures}")
    return figures


# ---- captioning: Qwen2.5-VL through transformers ----------------------------------------------------------

def caption(ctx: Context) -> dict:
    need("PIL")
    from PIL import Image

    from emoji_ldm.caption.prompt import DEFAULT_TEMPLATE
    from emoji_ldm.caption.qwen import QwenCaptioner
    from tests.tiny_models import tiny_qwen25_vl

    folder = tiny_qwen25_vl(ctx.work / "qwen25vl")
    captioner = QwenCaptioner(str(folder), DEFAULT_TEMPLATE, max_new_tokens=8 if ctx.quick else 16,
                              device=ctx.device)
    pictures = [Image.new("RGB", (72, 72), colour) for colour in ("gold", "crimson")]
    start = time.perf_counter()
    texts = captioner.generate(pictures, ["grinning face", "red heart"])
    ctx.sync()
    seconds = time.perf_counter() - start
    figures = {"images": len(texts), "captions": texts, "seconds": seconds,
               "model_dtype": str(captioner.model.dtype), "calls": captioner.calls}
    if len(texts) != 2 or not all(isinstance(t, str) for t in texts):
        raise AssertionError(f"two caption strings expected: {figures}")
    return figures


# ---- sampling: fp16 / bf16, with and without torch.compile ------------------------------------------------

def sampling(ctx: Context, dtype: str, compile: bool) -> dict:
    need("diffusers", "PIL")
    import torch

    from emoji_ldm.inference.compile import require_compiler
    from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler

    if compile:
        try:
            require_compiler(ctx.device)
        except Exception as e:
            raise Skip(f"no compiler for torch.compile here: {e}") from None
    sampler = Sampler.load(str(ctx.tiny_pipeline()), device=ctx.device,
                           options=InferenceOptions(dtype=dtype, compile=compile))
    steps = 2 if ctx.quick else 8
    n = 2 if ctx.quick else 8
    job = SampleJob(tuple(f"emoji {i}" for i in range(n)), tuple(range(n)), steps=steps)
    start = time.perf_counter()
    warmup = sampler.warm_up((n,), steps=2)  # a compiled UNet compiles here
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    images = sampler.sample([job])[0]
    ctx.sync()
    seconds = time.perf_counter() - start
    import numpy as np

    arrays = [np.asarray(im) for im in images]
    figures = {"dtype": dtype, "compile": compile, "unet_dtype": str(sampler.pipe.unet.dtype),
               "vae_dtype": str(sampler.pipe.vae.dtype), "images": len(images), "steps": steps,
               "size": list(images[0].size), "mode": images[0].mode, "warmup_s": warmup, "first_call_s": first_s,
               "seconds": seconds, "images_per_s": n / seconds,
               "distinct_images": len({a.tobytes() for a in arrays}),
               "pixel_std": float(np.mean([a[..., :3].std() for a in arrays]))}
    del sampler
    if ctx.cuda:
        torch.cuda.empty_cache()
    if len(images) != n or images[0].mode != "RGBA":
        raise AssertionError(f"{n} RGBA images expected: {figures}")
    return figures


# ---- the Generator drawing a set (its Sampler calls, without Ray Serve) ------------------------------------

def generator_set(ctx: Context) -> dict:
    need("diffusers", "PIL")
    import io
    import zipfile

    from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler
    from emoji_ldm.inference.settings import SamplerSettings
    from emoji_ldm.serve.sets import MANIFEST, SHEET, new_set_id, set_files, set_manifest, zip_bytes

    sampler = Sampler.load(str(ctx.tiny_pipeline()), device=ctx.device, options=InferenceOptions(dtype="auto"))
    theme, items = "space cats", ["rocket", "planet", "astronaut", "moon"]
    prompts = [f"{item}, {theme}, emoji" for item in items]
    seed = 42
    settings = SamplerSettings(steps=2 if ctx.quick else 8)
    job = SampleJob.of(tuple(prompts), (seed,) * len(items), settings)  # one seed: the set is one family
    start = time.perf_counter()
    made = sampler.pngs([job])[0]  # what Generator._sample_pngs returns for the set's job
    card = json.loads((ctx.tiny_pipeline() / "model_card.json").read_text())
    set_id = new_set_id()
    manifest = set_manifest(set_id, theme, items, prompts, {"seed": seed, "steps": settings.steps}, card,
                            sampler.model_uri or "")
    files = set_files(manifest, [png for png, _ in made], [params for _, params in made])
    data = zip_bytes(files, set_id)
    ctx.sync()
    seconds = time.perf_counter() - start
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    figures = {"items": len(items), "files": len(files), "zip_bytes": len(data), "zip_entries": len(names),
               "pipeline_calls": sampler.calls, "seconds": seconds, "unet_dtype": str(sampler.pipe.unet.dtype)}
    if not ({SHEET, MANIFEST} <= set(files) and len(files) == len(items) + 2 and sampler.calls == 1):
        raise AssertionError(f"a set of {len(items)} items + sheet + manifest in one pipeline call expected: "
                             f"{figures}")
    return figures


def ray_serve(ctx: Context) -> dict:
    if not installed("ray"):
        raise Skip("ray is not installed here (its cp312 wheel alone is 76 MiB, over what one call carries)")
    raise Skip("ray is importable, but `serve --gpus 1` is out of scope for this round: needs the Ray wheels, "
               "see docs/development.md")


# ---- the runner ---------------------------------------------------------------------------------------------

def checks(ctx: Context) -> list[tuple[str, object]]:
    out = [("deepspeed-zero2-bf16", lambda: deepspeed_check(ctx, 2)),
           ("deepspeed-zero3-bf16", lambda: deepspeed_check(ctx, 3)),
           ("train-step-check", lambda: step_check(ctx)),
           ("dreambooth-lora", lambda: dreambooth_lora(ctx)),
           ("encode", lambda: encode(ctx)),
           ("caption-qwen25vl", lambda: caption(ctx)),
           ("pixel32", lambda: pixel32(ctx))]
    for dtype in ("fp16", "bf16"):
        out.append((f"sample-{dtype}", lambda d=dtype: sampling(ctx, d, False)))
    for dtype in ("fp16", "bf16"):
        out.append((f"sample-{dtype}-compile", lambda d=dtype: _compiled(ctx, d)))
    out += [("generator-set", lambda: generator_set(ctx)), ("ray-serve", lambda: ray_serve(ctx))]
    return out


def _compiled(ctx: Context, dtype: str) -> dict:
    if not ctx.cuda and ctx.quick:
        raise Skip("--quick on the CPU: torch.compile (inductor's C++ build, a minute or more on 2 cores) is left "
                   "to the full run")
    return sampling(ctx, dtype, True)


def run_check(name: str, fn) -> dict:
    start = time.perf_counter()
    entry: dict = {"name": name}
    try:
        entry["figures"] = fn()
        entry["status"] = "pass"
    except Skip as e:
        entry.update(status="skip", figures={}, reason=str(e))
    except Exception as e:  # one failure must not stop the other checks
        entry.update(status="fail", figures={}, error=f"{type(e).__name__}: {e}"[:2000],
                     traceback=traceback.format_exc()[-4000:])
    entry["seconds"] = round(time.perf_counter() - start, 2)
    gc.collect()
    return entry


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "diffusers", "deepspeed", "peft", "accelerate", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def table(report: dict) -> str:
    lines = [f"gpu-check on {report['device']} ({report['date']}), {report['seconds']:.0f} s",
             f"{'check':<24} {'status':<6} {'seconds':>8}  note"]
    for c in report["checks"]:
        f = c.get("figures") or {}
        if c["status"] == "fail":
            note = c["error"].splitlines()[0][:90]
        elif c["status"] == "skip":
            note = c["reason"][:90]
        else:
            keys = ("step_ms", "images_per_s", "mfu_vs_measured", "mfu_vs_datasheet", "loss_after",
                    "ema_moved_max_abs")
            note = ", ".join(f"{k}={f[k]:.3g}" if isinstance(f[k], float) else f"{k}={f[k]}"
                             for k in keys if f.get(k) is not None)
        lines.append(f"{c['name']:<24} {c['status']:<6} {c['seconds']:>8.1f}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes and steps (the suite's test)")
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations in diffusers' and torch's own code
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    import torch

    try:  # the tiny models' loading bars and dtype notes would bury the table
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(args.device, args.quick, work)
    only = {n for n in args.only.split(",") if n}
    results = []
    try:
        for name, fn in checks(ctx):
            if only and name not in only:
                continue
            print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
            results.append(run_check(name, fn))
            print(f"gpu-check: {name}: {results[-1]['status']} ({results[-1]['seconds']} s)", file=sys.stderr,
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    report = {"checks": results, "device": device_name(args.device),
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
              "seconds": round(time.perf_counter() - start, 1), "versions": versions()}
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    print(f"report: {args.out}")
    return 1 if any(c["status"] == "fail" for c in results) else 0


if __name__ == "__main__":
    sys.exit(main())
