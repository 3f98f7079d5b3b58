"""Precision, accumulation, syncs and layout of the training step, on what a GPU run uses, reproduced on CPU:
one-rank DeepSpeed engines over gloo (`DS_ACCELERATOR=cpu`), a mocked CUDA capability, and the ops that make a
GPU wait counted by a dispatch mode."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from emoji_ldm.models.presets import get_preset
from emoji_ldm.train.speed import SpeedOptions, batch_layout

TINY = {"unet.block_out_channels": "32,32"}
ONE_LEVEL = {"unet.block_out_channels": "32", "unet.down_block_types": "CrossAttnDownBlock2D",  # cross-attention,
             "unet.up_block_types": "CrossAttnUpBlock2D", "unet.layers_per_block": "1"}  # the mid block: fewer ops


def _worker(precision: str):
    from emoji_ldm.train.runner import Worker
    from emoji_ldm.train.speed import torch_dtype

    return Worker(0, 1, torch.device("cpu"), precision, torch_dtype(precision))


def _unet_engine(zero_stage: int, precision: str = "bf16", speed: SpeedOptions = SpeedOptions(), preset=None):
    """The tiny UNet in `runner.create_engine`, as `ldm.py` builds it: (engine, preset)."""
    from emoji_ldm.models.builders import build_unet, configure_trainable
    from emoji_ldm.train import runner
    from emoji_ldm.train.speed import prepare_unet

    preset = preset or get_preset("tiny", TINY)
    torch.manual_seed(0)
    unet = prepare_unet(build_unet(preset), speed, convert_weights=False)
    params = configure_trainable(unet, preset)
    engine, _ = runner.create_engine(unet, params, lr=1e-3, weight_decay=0.0, lr_lambda=lambda s: 1.0, micro=2,
                                     grad_accum=1, grad_clip=1.0, zero_stage=zero_stage,
                                     worker=_worker(precision), speed=speed)
    return engine, preset


def _unet_step(engine, preset, dtype=torch.bfloat16, layout=torch.contiguous_format):
    """One micro-batch (latents in `layout`, as `batch_layout` gives them) through the real loss, the engine's
    backward and step; returns the loss."""
    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.train.step import micro_batch_loss

    width = engine.module.config.cross_attention_dim
    recipe = SimpleNamespace(caption_dropout=0.0, noise_offset=0.0, snr_gamma=None, timesteps="uniform")
    latents = torch.randn(2, 4, 8, 8).contiguous(memory_format=layout)  # (B, C, h, w)
    loss = micro_batch_loss(engine, noise_scheduler(preset), latents, torch.randn(2, 16, width),
                            torch.zeros(16, width), recipe, "epsilon", dtype)
    engine.backward(loss)
    engine.step()
    return loss.detach()


# --- bf16 gradient accumulation --------------------------------------------------------------------------------


def test_bf16_deepspeed_config_accumulates_in_fp32():
    from emoji_ldm.train.runner import deepspeed_config

    for stage in (1, 2, 3):
        assert deepspeed_config(2, 4, 1.0, stage, "bf16")["data_types"] == {"grad_accum_dtype": "fp32"}
    # DeepSpeed 0.19 has no fp32 accumulation without ZeRO; fp16 accumulates scaled fp16 gradients; fp32 is fp32
    assert "data_types" not in deepspeed_config(2, 4, 1.0, 0, "bf16")
    assert all("data_types" not in deepspeed_config(2, 4, 1.0, 2, p) for p in ("fp16", "no"))


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_bf16_gradients_accumulate_in_fp32(one_rank_gloo, zero_stage):
    """Four micro-batches whose gradients are 1 and three of 2^-9: each 2^-9 is half of bf16's spacing at 1
    (8 bits of mantissa), so a bf16 running sum rounds back to 1 every time and the three are lost. In fp32 the
    sum is 1 + 3 x 2^-9. With SGD at lr 1 from 0 the fp32 master becomes minus the accumulated gradient. ZeRO 2/3
    reduce each micro-batch's (exact) bf16 gradient and sum in fp32; ZeRO 1 (DeepSpeed's bf16 optimizer) sums in
    fp32 and all-reduces the sum in bf16 (its communication dtype), one rounding instead of one per addition."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from emoji_ldm.train.runner import deepspeed_config

    layer = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(layer.weight)
    engine, *_ = deepspeed.initialize(model=layer, optimizer=torch.optim.SGD(layer.parameters(), lr=1.0),
                                      config=deepspeed_config(1, 4, 0.0, zero_stage, "bf16"),
                                      dist_init_required=False)
    for x in (4.0, 2.0**-7, 2.0**-7, 2.0**-7):  # DeepSpeed scales each loss by 1/4: gradients 1, 2^-9 x 3
        engine.backward(engine(torch.tensor([[x]], dtype=torch.bfloat16)).float().sum())
        engine.step()
    exact = 1 + 3 * 2.0**-9
    expected = exact if zero_stage > 1 else float(torch.tensor(exact).bfloat16())  # 1 + 2^-7 at ZeRO 1
    assert -safe_get_full_fp32_param(engine.module.weight).item() == expected != 1.0
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)


# --- precision auto --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_auto_precision_follows_the_gpus_bf16_units(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) emulate bf16: auto trains them in fp16 with loss scaling; A100 (8.0) and H100
    (9.0) in bf16. Without --gpu auto is fp32; an explicit choice is kept."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    auto = SpeedOptions()
    assert auto.resolved_precision(use_gpu=True) == expected
    assert auto.resolved_precision(use_gpu=False) == "no"
    assert SpeedOptions(precision="bf16").resolved_precision(use_gpu=True) == "bf16"
    assert auto.summary(use_gpu=True) == ("precision fp16 (auto: this GPU has no bf16 units)" if expected == "fp16"
                                          else "precision bf16")


def test_auto_precision_on_a_driver_without_a_gpu(monkeypatch):
    """The driver (a CPU head node) cannot see the workers' GPUs: its answer is not used to train, and it must not
    fail or claim fp16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert SpeedOptions().resolved_precision(use_gpu=True) == "bf16"


# --- no host-device sync in a step ------------------------------------------------------------------------------


class DeviceWaits(TorchDispatchMode):
    """Records the ATen ops that make the host wait for a GPU: reading a value (`.item()`, `float()`, `bool()`:
    `_local_scalar_dense`), and ops whose output size depends on the data (`nonzero`, `masked_select`, indexing
    with a boolean mask). On CPU they are cheap; what is counted is that they are called."""

    SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_consecutive",
             "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = name in ("index", "index_put", "index_put_") and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if name in self.SYNCS or masks:
            self.seen.append(name + (" (boolean mask)" if masks else ""))
        return func(*args, **(kwargs or {}))


def test_a_training_step_does_not_wait_for_the_device():
    """`Loop.train_step` with the real loss (caption dropout on), backward, clipping and optimizer step of a
    `PlainEngine`: no op that waits for the GPU. The loss and the gradient norm stay tensors for `_log`. (SGD: an
    AdamW's step counter is a CPU tensor on a GPU too, read on the host without waiting.)"""
    from emoji_ldm.models.builders import build_unet, noise_scheduler
    from emoji_ldm.train import loop
    from emoji_ldm.train.step import PlainEngine, micro_batch_loss

    preset = get_preset("tiny", ONE_LEVEL)
    torch.manual_seed(0)
    unet = build_unet(preset)
    opt = torch.optim.SGD(unet.parameters(), lr=1e-3)
    engine = PlainEngine(unet, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1.0, unet.parameters())
    noise, width = noise_scheduler(preset), unet.config.cross_attention_dim
    recipe = SimpleNamespace(caption_dropout=0.5, noise_offset=0.1, snr_gamma=5.0, timesteps="uniform")

    def forward(_):
        latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 16, width)  # (B, C, h, w), (B, L, D)
        return micro_batch_loss(engine, noise, latents, text, torch.zeros(16, width), recipe, "epsilon",
                                torch.float32), {}

    step = loop.one_process(engine, [], forward, micro=4, device="cpu", grad_accum=2)  # no checkpoint, no logger
    with DeviceWaits() as waits:
        assert step.train_step(iter(range(2)))
    assert waits.seen == []
    assert all(isinstance(v, torch.Tensor) for v in (*step.window.losses, *step.window.norms))
    assert len(step.window.losses) == 2 and float(step.window.norms[0]) > 0


def test_batches_reach_the_device_as_float32(monkeypatch):
    """`to_device`: float16 rows of the latent table (numpy) or a CPU tensor (the VAE's pixels) as float32 in the
    asked layout; on a GPU through pinned memory and a non-blocking copy (seen here with a recording stand-in for
    the CUDA device: pin_memory, then `.to(cuda, non_blocking=True)`, then the cast on the device)."""
    import numpy as np

    from emoji_ldm.train.step import to_device

    latents = to_device(np.ones((2, 4, 3, 3), np.float16), torch.device("cpu"), torch.channels_last)
    assert latents.dtype == torch.float32 and latents.is_contiguous(memory_format=torch.channels_last)
    assert to_device(torch.ones(2, 3, dtype=torch.float16), torch.device("cpu")).dtype == torch.float32
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    real_to = torch.Tensor.to

    def to(t, *args, **kwargs):
        calls.append(("to", *map(str, args), *sorted(kwargs.items())))
        return real_to(t, *[torch.device("cpu") if a == torch.device("cuda") else a for a in args], **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    to_device(np.ones((2, 3), np.float16), torch.device("cuda"))
    assert calls[:2] == ["pin", ("to", "cuda", ("non_blocking", True))]


def test_caption_dropout_without_a_mask_index():
    """torch.where instead of boolean-mask indexing: the dropped rows are the empty caption, the others kept."""
    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.train.step import micro_batch_loss

    seen = {}

    def engine(noisy, t, encoder_hidden_states):
        seen["cond"] = encoder_hidden_states
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    latents, text, empty = torch.randn(6, 4, 8, 8), torch.randn(6, 3, 5), torch.full((3, 5), 7.0)
    torch.manual_seed(1)
    drop = torch.rand(6) < 0.5  # the draws micro_batch_loss makes first
    torch.manual_seed(1)
    micro_batch_loss(engine, noise_scheduler(get_preset("tiny")), latents, text, empty,
                     SimpleNamespace(caption_dropout=0.5, noise_offset=0.0, snr_gamma=None, timesteps="uniform"),
                     "epsilon", torch.float32)
    assert 0 < drop.sum() < 6
    assert torch.equal(seen["cond"][drop], empty.expand(int(drop.sum()), 3, 5))
    assert torch.equal(seen["cond"][~drop], text[~drop])


# --- channels-last under DeepSpeed -----------------------------------------------------------------------------


def _conv_inputs(module) -> list:
    """Records whether each Conv2d's input is channels-last, as the convolution sees it (after any pre-hook)."""
    seen = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda m, args: seen.append(
                args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    return seen


def _channels_last(weight) -> bool:
    return weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_weights_at_zero_0(one_rank_gloo):
    """ZeRO 0: the UNet's weights are channels-last once the engine is built (after DeepSpeed's byte-view
    broadcast, which needs NCHW), and stay so through a step that changes them: the optimizer holds the same
    Parameter objects. Every convolution then runs channels-last, whatever layout its input has."""
    engine, preset = _unet_engine(0, "bf16", SpeedOptions(channels_last=True))
    convs = [m.weight for m in engine.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(_channels_last(w) for w in convs)
    before = [w.detach().clone() for w in convs]
    _unet_step(engine, preset)
    assert all(_channels_last(w) for w in convs)
    assert sum(not torch.equal(w, b) for w, b in zip(convs, before)) > len(convs) // 2  # trained


def test_channels_last_convolutions_at_zero_2(one_rank_gloo):
    """ZeRO 1-3: the weights are views of DeepSpeed's flat NCHW buffer (converting them would cut them off from
    the optimizer), so each convolution's input is made channels-last. With channels-last batches alone only the
    first few are: the attention blocks hand back NCHW activations."""
    speed = SpeedOptions(channels_last=True)
    engine, preset = _unet_engine(2, "bf16", speed)
    flat = engine.optimizer.bit16_groups_flat[0]
    weight = engine.module.conv_in.weight
    assert flat.data_ptr() <= weight.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
    seen = _conv_inputs(engine.module)
    _unet_step(engine, preset, layout=batch_layout(speed))
    assert len(seen) > 20 and all(seen)


def test_a_cpu_worker_leaves_out_deepspeeds_shared_memory_all_reduce(one_rank_gloo, monkeypatch):
    """A Ray Train worker on CPU (`setup_worker`, then `create_engine`) connects DeepSpeed without compiling its
    shared-memory all-reduce (a C++ op for inference: 25 to 60 s on 2 cores, the first time on a machine and again
    whenever another ninja loads it)."""
    import deepspeed
    import deepspeed.ops
    import ray.train
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    from emoji_ldm.train import runner

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)  # a fresh worker's
    monkeypatch.setattr(ShareMemCommBuilder, "load", lambda *a, **k: pytest.fail("compiled the shared-memory op"))
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0,
                                                                           get_world_size=lambda: 1))
    threads = torch.get_num_threads()
    try:
        worker = runner.setup_worker(False, 1, 0, SpeedOptions())
    finally:
        torch.set_num_threads(threads)
    layer = torch.nn.Linear(3, 1)
    engine, _ = runner.create_engine(layer, list(layer.parameters()), lr=1e-3, weight_decay=0.0,
                                     lr_lambda=lambda s: 1.0, micro=2, grad_accum=1, grad_clip=1.0, zero_stage=2,
                                     worker=worker, speed=SpeedOptions())
    assert deepspeed.comm.comm.cdb.shm_comm_op is None
    engine.backward(engine(torch.ones(2, 3)).sum())
    engine.step()  # ZeRO-2's gradient reduction, through gloo


# --- ZeRO-3's banner ---------------------------------------------------------------------------------------------


def test_zero3_banner_counts_the_partitioned_parameters(one_rank_gloo):
    """Under ZeRO-3 a parameter outside a gather has numel() 0; the banner counts DeepSpeed's ds_numel."""
    from emoji_ldm.models.builders import build_unet, count_params
    from emoji_ldm.train.ldm import WorkerConfig, _describe

    preset = get_preset("tiny", TINY)
    whole = count_params(build_unet(preset))
    engine, _ = _unet_engine(3, "bf16", preset=preset)
    assert sum(p.numel() for p in engine.module.parameters()) == 0  # what the banner used to add up
    run = WorkerConfig(preset={}, latent_uri="", latent_version=0, zero_stage=3, use_gpu=False, threads=1,
                       empty_emb=[], out="", vae="", image={}, speed=SpeedOptions(precision="bf16"))
    banner = _describe(preset, engine.module, 12, run)
    assert banner.startswith(f"preset tiny, UNet {whole / 1e6:.2f}M params ({whole / 1e6:.2f}M trainable, mode ")
    assert whole > 100_000 and "12 micro-batches per rank per epoch; precision bf16" in banner


# --- DeepSpeed's compile path ------------------------------------------------------------------------------------


def test_compile_through_deepspeed(one_rank_gloo):
    """`compile_engine` on a DeepSpeed engine (ZeRO 2, bf16): `engine.compile()` with the options' kwargs, then the
    real step trains through the compiled module. The backend is eager (dynamo's graph capture through
    DeepSpeed's engine and hooks, without inductor's C++ kernel build; aot_eager took twice as long here):
    inductor on CPU is tested through the step check, and through DeepSpeed it was run on an H200."""
    from emoji_ldm.train.speed import compile_engine

    preset = get_preset("tiny", ONE_LEVEL)
    engine, _ = _unet_engine(2, "bf16", preset=preset)
    torch._dynamo.reset()
    compile_engine(engine, SpeedOptions(compile=True), backend="eager")
    assert engine.is_compiled and engine._compile_kwargs == {"dynamic": False}
    before = engine.module.conv_in.weight.detach().clone()
    counts = torch._dynamo.utils.counters
    counts.clear()
    losses = [_unet_step(engine, preset) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert counts["stats"]["unique_graphs"] >= 1  # the forward ran as a compiled graph
    assert not torch.equal(engine.module.conv_in.weight, before)


def test_the_log_step_reads_the_window(one_rank_gloo, tmp_path):
    """At a log step the window's loss and gradient-norm tensors become the line's numbers (one read, after the
    all-reduce): the mean of the steps' norms, as a float in metrics.jsonl."""
    import json

    from emoji_ldm.train import loop
    from emoji_ldm.train.metrics import MetricsLogger
    from emoji_ldm.train.runner import Worker

    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    step = loop.Loop.__new__(loop.Loop)
    step.recipe = SimpleNamespace(worker=Worker(0, 1, torch.device("cpu"), "no", torch.float32),
                                  scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    step.window = loop._Window(losses=[torch.tensor(1.0), torch.tensor(3.0)], norms=[torch.tensor(0.5),
                               torch.tensor(1.5, dtype=torch.float64)], images=8, seconds=2.0, steps=2)
    step.log = MetricsLogger(str(tmp_path), "t", 2)
    step._log(2)
    step.log.flush()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["loss"] == 2.0 and line["grad_norm"] == 1.0 and isinstance(line["grad_norm"], float)


def test_a_non_finite_loss_ends_the_run_before_a_checkpoint_keeps_it(one_rank_gloo, tmp_path, monkeypatch):
    """A NaN in the window: the log step raises one line naming the step and the learning rate, and a
    checkpoint-only step raises before `checkpoint.save` is reached (no checkpoint of a diverged model)."""
    from emoji_ldm.errors import UserError
    from emoji_ldm.train import checkpoint, loop
    from emoji_ldm.train.runner import Worker

    saved = []
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: saved.append(a))
    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    step = loop.Loop.__new__(loop.Loop)
    step.recipe = SimpleNamespace(worker=Worker(0, 1, torch.device("cpu"), "no", torch.float32), grid=None,
                                  scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                  schedule=loop.Schedule(10, 5, 3))
    step.log, step.ema, step.counters = None, None, {"step": 3}
    step.window = loop._Window(losses=[torch.tensor(1.0), torch.tensor(float("nan"))], steps=2, seconds=1.0)
    with pytest.raises(UserError, match=r"the loss is nan by step 3 \(learning rate 0\.1\): training diverged"):
        step.after_step(3)  # a checkpoint step, not a log step
    assert saved == []
    with pytest.raises(UserError, match="by step 5"):
        step._log(5)


def test_profile_steps_writes_a_trace_and_logs_the_busiest_ops(tmp_path):
    from emoji_ldm.train import loop
    from emoji_ldm.train.metrics import finish_profile, start_profile

    lines = []
    profile = start_profile(torch.device("cpu"))
    torch.nn.functional.conv2d(torch.randn(1, 3, 16, 16), torch.randn(4, 3, 3, 3))
    finish_profile(profile, str(tmp_path), SimpleNamespace(print=lines.append))
    assert json.loads((tmp_path / "profile" / "trace-rank0.json").read_text())["traceEvents"]
    assert lines[0].startswith("profile: ") and any("conv" in line for line in lines[1:]), lines
    assert loop.PROFILE_AFTER == 3


def test_every_recipe_shares_one_lr_schedule():
    from emoji_ldm.train.lr import preset_schedule, warmup_cosine

    f = warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10) == 1.0
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert {warmup_cosine(4, 1, 1.0)(s) for s in range(4, 100)} == {1.0}  # DreamBooth: constant after warm-up
    t = get_preset("tiny").train
    assert preset_schedule(get_preset("tiny"))(t.max_steps) == pytest.approx(t.min_lr / t.lr)
    with pytest.raises(ValueError, match="floor 2"):
        warmup_cosine(0, 10, 2)


def test_engine_adam_beta2(one_rank_gloo):
    """`train.adam_beta2` reaches the engine's AdamW (torch's default 0.999 otherwise)."""
    from emoji_ldm.train import runner

    layer = torch.nn.Linear(4, 4)
    for beta2 in (None, 0.95):
        extra = {} if beta2 is None else {"adam_beta2": beta2}
        engine, _ = runner.create_engine(layer, list(layer.parameters()), lr=1e-3, weight_decay=0.0,
                                         lr_lambda=lambda s: 1.0, micro=2, grad_accum=1, grad_clip=1.0, zero_stage=0,
                                         worker=_worker("no"), speed=SpeedOptions(), **extra)
        assert engine.optimizer.param_groups[0]["betas"] == (0.9, beta2 or 0.999)
