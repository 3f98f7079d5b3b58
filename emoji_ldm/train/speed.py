"""The GPU fast path of training: mixed precision, TF32, gradient checkpointing, channels-last, torch.compile.

One frozen config (`SpeedOptions`, flags of `train` and `train-step-check`)
and the one place that applies it to a UNet (`prepare_unet`) and to the
engine that drives it (`compile_engine`), so model code stays free of these
switches. Everything that changes numerics is off by default on CPU:
`precision auto` is bf16 on a GPU with bf16 units (NVIDIA Ampere, compute
capability 8.0, and newer), fp16 on an older GPU (V100, T4: bf16 there is
emulated, far slower than fp16), and full fp32 on CPU.

- precision: `bf16` runs the step in bfloat16 (DeepSpeed's bf16 mode in
  `train`: bf16 weights and activations, fp32 master weights in the
  optimizer, gradients accumulated over the micro-batches in fp32 under
  ZeRO 1-3; autocast in `train-step-check`); `fp16` adds dynamic loss
  scaling (DeepSpeed's `fp16` block; `torch.amp.GradScaler` in the step check)
  and needs a GPU.
- allow_tf32: TF32 tensor-core matmuls and convolutions for fp32 work on
  Ampere and newer (`torch.set_float32_matmul_precision("high")`).
- gradient_checkpointing: diffusers' `enable_gradient_checkpointing()`:
  activations are recomputed in the backward pass (less memory, more compute).
- channels_last: channels-last memory format, which cuDNN's convolutions
  prefer on GPUs. A convolution runs channels-last when its input or its
  weight is, and its output is channels-last; attention blocks hand back NCHW
  activations, so converting the batches alone leaves most convolutions NCHW.
  A bare UNet (the step check, serving) has its weights converted. Under
  DeepSpeed (`channels_last_engine`, after the engine is built: its start-up
  broadcast views every weight as bytes, which needs NCHW, "self.stride(-1)
  must be 1 to view BFloat16 as Byte"): at ZeRO 0 the weights are converted;
  at ZeRO 1-3 they are views of DeepSpeed's flat buffers (or partitions of
  them), which must stay NCHW, so each convolution's input is made
  channels-last instead (a forward pre-hook), and the batches too
  (`batch_layout`).
- compile: `torch.compile` of the UNet (inductor; on CPU it needs a C++
  compiler, which `make test` installs). DeepSpeed engines compile through
  `engine.compile()`, a bare module through `torch.compile`.
- attention: diffusers with torch 2 uses `F.scaled_dot_product_attention`
  (`AttnProcessor2_0`) by default; `check_sdpa` asserts it rather than
  assuming it, since a processor set elsewhere would silently lose the
  fused kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from emoji_ldm.config import check_choice, opt
from emoji_ldm.errors import UserError
from emoji_ldm.inference.compile import COMPILE_MODES, compile_kwargs, require_compiler

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class SpeedOptions:
    precision: str = opt("auto", choices=PRECISIONS,
                         help="mixed precision: auto (bf16 on a GPU with bf16 units, Ampere and newer; fp16 on an "
                              "older GPU; none on CPU) | no | bf16 | fp16 (GPU only, with dynamic loss scaling)")
    allow_tf32: bool = opt(False, help="TF32 matmuls and convolutions for fp32 work (Ampere and newer GPUs)")
    gradient_checkpointing: bool = opt(False, help="recompute the UNet's activations in the backward pass: less "
                                                   "memory, about a third more compute")
    channels_last: bool = opt(False, help="the UNet in channels-last memory format (faster convolutions on GPUs)")
    compile: bool = opt(False, help="torch.compile the UNet (inductor); the first steps pay the compile")
    compile_mode: str = opt("default", choices=COMPILE_MODES, help="torch.compile mode")
    profile_steps: int = opt(0, help="profile this many optimizer steps on rank 0, after 3 warm-up steps: a "
                                     "Chrome trace under OUT/profile/ and the busiest ops in the log (0: off)")
    async_checkpoints: bool = opt(False, help="upload each checkpoint in the background (Ray Train's ASYNC upload "
                                              "mode): training goes on while it goes to storage")

    def __post_init__(self):
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--compile-mode", self.compile_mode, COMPILE_MODES)
        if not 0 <= self.profile_steps <= 100:
            raise UserError(f"--profile-steps must be from 0 to 100, got {self.profile_steps}")

    def resolved_precision(self, use_gpu: bool) -> str:
        """no | bf16 | fp16; fp16 without a GPU is refused (CPUs have no fp16 matmul worth having). `auto` is
        resolved where the GPU is (each worker): bf16 where it has bf16 units, else fp16."""
        if self.precision == "fp16" and not use_gpu:
            raise UserError("--precision fp16 needs a GPU (--gpu); on CPU use bf16 or no")
        if self.precision == "auto":
            return ("bf16" if native_bf16() else "fp16") if use_gpu else "no"
        return self.precision

    def summary(self, use_gpu: bool) -> str:
        on = [name for name in ("allow_tf32", "gradient_checkpointing", "channels_last") if getattr(self, name)]
        if self.compile:
            on.append(f"compile ({self.compile_mode})")
        precision = self.resolved_precision(use_gpu)
        if self.precision == "auto" and precision == "fp16":
            precision += " (auto: this GPU has no bf16 units)"
        return f"precision {precision}" + (", " + ", ".join(on) if on else "")


def native_bf16() -> bool:
    """Whether this process's GPU computes in bf16 natively: NVIDIA compute capability 8.0 (Ampere) and newer,
    and ROCm GPUs. Older NVIDIA GPUs (V100 7.0, T4 7.5) emulate it. A process that sees no GPU (a driver on a
    CPU node) says True: only a worker's answer, on its own GPU, picks the precision it trains in."""
    import torch

    if torch.version.hip or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability() >= (8, 0)


def torch_dtype(precision: str):
    import torch

    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def deepspeed_precision(precision: str, zero_stage: int) -> dict:
    """The DeepSpeed config blocks for a resolved precision.

    bf16 at ZeRO 0 (plain data parallel) is torch autocast over fp32 weights (DeepSpeed's `torch_autocast` block),
    as a DDP run trains: the client's optimizer steps the fp32 parameters themselves, gradients are fp32, and
    nothing in the step reads the device. DeepSpeed's `bf16` block at ZeRO 0 runs its unfused fp16 optimizer
    instead: bf16 weights with fp32 copies, an overflow test read to the host for every parameter, a norm read per
    group, and gradients summed in bf16 over the micro-batches.

    bf16 under ZeRO 1-3 accumulates the micro-batches' gradients in fp32 (`data_types.grad_accum_dtype`;
    DeepSpeed's default is the model's dtype, and a sum of bf16 gradients keeps 8 bits of mantissa). ZeRO 2/3
    keep fp32 accumulation buffers; ZeRO 1 then runs DeepSpeed's bf16 optimizer, which accumulates in fp32 too.
    Its overflow check (`bf16.check_grad_overflow`) is off: bf16 has no loss scale to protect, and at ZeRO 2 the
    check all-reduces a flag and reads it to the host every step (ZeRO 1's bf16 optimizer and ZeRO 3 test the
    norm whatever the config says). fp16 accumulates scaled fp16 gradients, as DeepSpeed's loss scaling expects,
    and keeps its overflow check: a step whose scaled gradients overflowed must be skipped."""
    if precision == "fp16":  # dynamic loss scaling: loss_scale 0 starts at 2^16 and halves on overflow
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                         "hysteresis": 2, "min_loss_scale": 1}}
    if precision != "bf16":
        return {"bf16": {"enabled": False}}
    if zero_stage == 0:
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    return {"bf16": {"enabled": True, "check_grad_overflow": False}, "data_types": {"grad_accum_dtype": "fp32"}}


def check_sdpa(unet) -> None:
    """Every attention layer runs PyTorch's fused scaled_dot_product_attention (diffusers' AttnProcessor2_0)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    slow = sorted({type(p).__name__ for p in unet.attn_processors.values() if not isinstance(p, AttnProcessor2_0)})
    if slow:
        raise RuntimeError(f"the UNet's attention does not use scaled_dot_product_attention: processors {slow}; "
                           "call unet.set_attn_processor(AttnProcessor2_0())")


def prepare_unet(unet, speed: SpeedOptions, convert_weights: bool = True):
    """Apply the options that change the module itself (before the optimizer or DeepSpeed sees it).

    convert_weights=False (DeepSpeed): channels-last comes after the engine is built, see `channels_last_engine`.
    """
    import torch

    check_sdpa(unet)
    if speed.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    if speed.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if speed.channels_last and convert_weights:
        unet.to(memory_format=torch.channels_last)
    return unet


def channels_last_engine(engine, speed: SpeedOptions, zero_stage: int) -> None:
    """--channels-last on the module of a DeepSpeed engine just built (see the module docstring): its weights at
    ZeRO 0 (the optimizer holds the same Parameter objects, whose data is swapped), a channels-last input for each
    convolution at ZeRO 1-3."""
    import torch

    if not speed.channels_last:
        return
    if zero_stage == 0:
        engine.module.to(memory_format=torch.channels_last)
        return
    for module in engine.module.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(_channels_last_input)


def _channels_last_input(module, args):
    """A Conv2d's forward pre-hook: its (B, C, H, W) input in channels-last (a no-op when it already is)."""
    import torch

    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def batch_layout(speed: SpeedOptions):
    """The memory format for (B, C, h, w) batches."""
    import torch

    return torch.channels_last if speed.channels_last else torch.contiguous_format


def compile_engine(engine, speed: SpeedOptions, backend: str | None = None) -> None:
    """torch.compile the engine's UNet: DeepSpeed's `engine.compile()`, or the module of a `PlainEngine`.
    `backend` None is inductor (DeepSpeed: its accelerator's compile backend, inductor on CUDA and CPU)."""
    if not speed.compile:
        return
    import torch

    if backend in (None, "inductor"):
        require_compiler(next(engine.module.parameters()).device.type)
    kwargs = compile_kwargs(speed.compile_mode, static=True)
    if hasattr(engine, "compile") and callable(engine.compile):  # a DeepSpeed engine
        engine.compile(**({"backend": backend} if backend else {}), compile_kwargs=kwargs)
    else:
        engine.module = torch.compile(engine.module, **({"backend": backend} if backend else {}), **kwargs)
