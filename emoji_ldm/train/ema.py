"""The EMA of the trained weights, always in fp32, fed from the optimizer's fp32 master weights.

Under DeepSpeed bf16 the module's parameters are bf16: an EMA copied from them is bf16 too, and an update of
(1 - 0.9999) x (s - p) is below bf16's resolution, so such an EMA stops moving. `ExponentialMovingAverage` keeps
fp32 shadows, and `master_weights` reads what the optimizer really holds: the fp32 masters
(`deepspeed.utils.safe_get_full_fp32_param`) where DeepSpeed keeps them apart from the module, the parameter
itself where the module is fp32 (no master copy exists).

The decay schedule is diffusers' `EMAModel` one: without warm-up (1 + step) / (10 + step), with it
1 - (1 + step)^-power, capped at `decay`; its state dict uses `EMAModel`'s key names.
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
        """One update towards `tensors` (any dtype; upcast to fp32), taken one at a time: `tensors` may be a
        generator that gathers each as it goes (`master_weights`), so no second full copy is ever held."""
        self.optimization_step += 1
        weight = 1 - self.get_decay(self.optimization_step)
        for s, t in zip(self.shadow_params, tensors, strict=True):
            s.lerp_(t.detach().to(s.device, torch.float32), weight)  # s += (1 - decay) (p - s)

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


def master_weights(params):
    """The fp32 weights the optimizer updates, one full tensor per parameter, yielded one at a time.

    A collective under ZeRO (the fp32 masters are partitioned, each is gathered as it is yielded): every rank
    must consume all of it, in the same order. An fp32 parameter outside ZeRO-3 is its own master and is yielded
    as it is, without a gather. Under ZeRO-3 only one parameter is ever gathered at once, so the ranks never
    hold a second full copy of the model; only rank 0 keeps an EMA.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    for p in params:
        if p.dtype == torch.float32 and not hasattr(p, "ds_id"):
            yield p.detach()
            continue
        master = safe_get_full_fp32_param(p)
        yield p.detach().float() if master is None else master


def update_ema(ema, params) -> None:
    """Every rank: read the masters (a collective under ZeRO); rank 0, the only one with an EMA, averages them."""
    masters = master_weights(params)
    if ema is None:
        for _ in masters:
            pass
    else:
        ema.step(masters)
