"""`make gpu-check`'s training checks: DeepSpeed ZeRO-2/3 on one rank (steps, the fp32 EMA, a checkpoint and a
resume), train-step-check's MFU, DreamBooth LoRA, and the demo's pixel32 model. Each builds tiny random models of
the real classes and steps through the training loop of one process (`emoji_ldm.train.loop.one_process`)."""

from __future__ import annotations

import gc
import math
import os
import socket
import time

from gpu_check.context import DATASHEET_PEAKS, Context, need

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
        overrides["unet.block_out_channels"] = "32,32,32"
    preset = get_preset("pixel32", overrides)
    torch.manual_seed(0)
    vae = build_vae(preset).to(ctx.device)  # PatchAutoencoder: no weights, 2x2 patches as channels
    pixels = torch.rand(8, 4, 32, 32, device=ctx.device) * 2 - 1  # (B, 4, 32, 32) RGBA in [-1, 1]
    with torch.no_grad():
        latents = vae.encode(pixels.to(torch.bfloat16)).latent_dist.mode()  # (B, 16, 16, 16) in bf16
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
    ok = (figures["latent_shape"] == [8, 16, 16, 16] and round_trip < 1e-2 and all(map(math.isfinite, losses))
          and all(s["size"] == [32, 32] and s["mode"] == "RGBA" and s["vae"] == "PatchAutoencoder"
                  for s in sampled.values()))
    if not ok:
        raise AssertionError(f"exact patches, finite losses and 32x32 RGBA from fp16 and bf16 expected: {figures}")
    return figures
