"""The EMA of the trained weights, always in fp32, fed from the optimizer's fp32 master weights.

Under DeepSpeed bf16 the module's parameters are bf16: an EMA copied from them is bf16 too, and an update of
(1 - 0.9999) x (s - p) is below bf16's resolution, so such an EMA stops moving. `ExponentialMovingAverage` keeps
fp32 shadows, and `master_weights` reads what the optimizer really holds: the fp32 masters
(`deepspeed.utils.safe_get_full_fp32_param`) where DeepSpeed keeps them apart from the module, the parameter
itself where the module is fp32 (no master copy exists).

The decay schedule is diffusers' `EMAModel` one: without warm-up (1 + step) / (10 + step), with it
1 - (1 + step)^-power, capped at `decay`. Its state dict uses the same key names as `EMAModel`'s, so checkpoints
written before this module load too.
"""

from __future__ import annotations

import torch


class ExponentialMovingAverage:
    def __init__(self, tensors, decay: float, use_warmup: bool = False, power: float = 2 / 3):
        self.shadow_params = [t.detach().to(torch.float32).clone() for t in tensors]
        self.decay, self.use_warmup, self.power = decay, use_warmup, power
        self.optimization_step = 0

    def get_decay(self, optimization_step: int) -> float:
        step = max(0, optimization_step - 1)
        if step <= 0:
            return 0.0
        decay = 1 - (1 + step) ** -self.power if self.use_warmup else (1 + step) / (10 + step)
        return min(decay, self.decay)

    @torch.no_grad()
    def step(self, tensors) -> None:
        """One update towards `tensors` (any dtype; upcast to fp32 first)."""
        self.optimization_step += 1
        weight = 1 - self.get_decay(self.optimization_step)
        current = [t.detach().to(s.device, torch.float32) for s, t in zip(self.shadow_params, tensors)]
        torch._foreach_lerp_(self.shadow_params, current, weight)  # s += (1 - decay) (p - s)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow_params, params):
            p.data.copy_(s.to(p.device, p.dtype))

    def to(self, device) -> ExponentialMovingAverage:
        self.shadow_params = [s.to(device) for s in self.shadow_params]
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "use_ema_warmup": self.use_warmup, "power": self.power,
                "optimization_step": self.optimization_step, "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow_params"]) != len(self.shadow_params):
            raise ValueError(f"the EMA in the checkpoint has {len(state['shadow_params'])} tensors, the model "
                             f"{len(self.shadow_params)}")
        self.optimization_step = int(state["optimization_step"])
        device = self.shadow_params[0].device if self.shadow_params else "cpu"
        self.shadow_params = [s.to(device, torch.float32) for s in state["shadow_params"]]


def make_ema(params, recipe) -> ExponentialMovingAverage:
    """An fp32 EMA of `params` with the preset's decay and warm-up (`recipe` is the preset's `TrainSpec`)."""
    return ExponentialMovingAverage(params, decay=recipe.ema_decay, use_warmup=recipe.ema_warmup,
                                    power=recipe.ema_power)


def master_weights(params) -> list[torch.Tensor]:
    """The fp32 weights the optimizer updates, one full tensor per parameter.

    A collective under ZeRO (the fp32 masters are partitioned and gathered): every rank must call it, in the
    same order. An fp32 parameter outside ZeRO-3 is its own master and is returned as it is, without a gather.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in params:
        if p.dtype == torch.float32 and not hasattr(p, "ds_id"):
            out.append(p.detach())
            continue
        master = safe_get_full_fp32_param(p)
        out.append(p.detach().float() if master is None else master)
    return out
