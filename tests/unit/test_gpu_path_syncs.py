"""What the shipped DeepSpeed config makes a GPU wait for, reproduced on CPU: one-rank engines over gloo
(`DS_ACCELERATOR=cpu`), with DeepSpeed's accelerator `synchronize()` counted and the ATen ops that read a device
value to the host (`.item()`, `bool()`, `float()`: `_local_scalar_dense`) recorded by a dispatch mode. On CPU
they cost nothing; on a GPU each stalls the host until every queued kernel has run."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Records every read of a device value by the host."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "equal"):
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _engine(stage: int, precision: str, grad_clip: float = 1.0):
    """A small model under `runner.deepspeed_config`, as the recipes configure DeepSpeed. (SGD: an AdamW's step
    counter is a CPU tensor on a GPU too, read on the host without waiting.)"""
    import deepspeed

    from emoji_ldm.train.runner import deepspeed_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(2, 1, grad_clip, stage, precision),
                                      dist_init_required=False)
    return engine


def _step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loss = engine(torch.randn(2, 4, generator=g).to(_input_dtype(engine))).float().pow(2).mean()
    engine.backward(loss)
    engine.step()


def _input_dtype(engine):
    return next(engine.module.parameters()).dtype


@pytest.mark.parametrize("stage,precision", [(0, "no"), (0, "bf16"), (2, "bf16"), (3, "bf16")])
def test_an_engine_step_never_synchronizes_the_device(one_rank_gloo, monkeypatch, stage, precision):
    """DeepSpeed's throughput timer synchronizes the device twice in every micro-step from its third step on
    (`timers.throughput.synchronized`), to time steps nobody reads: the config turns the timer off."""
    from deepspeed.accelerator import get_accelerator

    engine = _engine(stage, precision)
    calls = []
    accelerator = get_accelerator()
    original = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    for seed in range(5):
        _step(engine, seed)
    assert calls == []


def test_a_bf16_zero2_step_reads_no_overflow_flag(one_rank_gloo):
    """bf16 has no loss scale to protect, yet DeepSpeed's ZeRO 1/2 optimizer all-reduces an overflow flag and reads
    it with `.item()` every step unless `bf16.check_grad_overflow` is off. What remains is one read in DeepSpeed's
    clipping (`unscale_and_clip_grads` asks whether the norm is finite), which no config turns off while
    gradient_clipping is set."""
    engine = _engine(2, "bf16")
    _step(engine, 0)
    with HostReads() as reads:
        _step(engine, 1)
    assert reads.seen == ["_local_scalar_dense"]
    no_clip = _engine(2, "bf16", grad_clip=0.0)
    with HostReads() as reads:
        _step(no_clip, 1)
    assert reads.seen == []


def test_a_bf16_zero0_step_reads_nothing(one_rank_gloo):
    """ZeRO 0 (plain data parallel) in bf16 is torch autocast over fp32 weights: the optimizer is the client's
    own, on the fp32 parameters (their own masters) and the clipping stays on the device. DeepSpeed's `bf16` block
    at ZeRO 0 would run its unfused fp16 optimizer instead: an overflow test read per parameter, a norm read per
    group, and gradients accumulated in bf16."""
    engine = _engine(0, "bf16")
    assert type(engine.optimizer).__name__ == "SGD" and _input_dtype(engine) == torch.float32
    assert engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.bfloat16
    _step(engine, 0)
    with HostReads() as reads:
        _step(engine, 1)
    assert reads.seen == []


def test_zero0_bf16_runs_the_matmuls_in_bf16(one_rank_gloo):
    """Autocast really computes in bf16: the linear layers' outputs are bf16 inside the engine's forward."""
    engine = _engine(0, "bf16")
    seen = []
    engine.module[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    _step(engine, 0)
    assert seen == [torch.bfloat16]
