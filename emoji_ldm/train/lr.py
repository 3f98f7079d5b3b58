"""The learning-rate schedule every recipe and check trains with: a linear warm-up, then a cosine to a floor.

A factor of the base learning rate for torch's `LambdaLR`, per optimizer step:

    step < warmup:  (step + 1) / warmup
    after:          floor + (1 - floor) x (1 + cos(pi x progress)) / 2,  progress = (step - warmup) / (steps - warmup)

`floor` 1.0 is a constant rate after the warm-up (DreamBooth), 0.1 the VAE's, `min_lr / lr` a preset's.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup: int, steps: int, floor: float) -> Callable[[int], float]:
    if warmup < 0 or steps < 1 or not 0 <= floor <= 1:
        raise ValueError(f"warmup {warmup}, steps {steps}, floor {floor}: warmup >= 0, steps >= 1, 0 <= floor <= 1")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def preset_schedule(preset) -> Callable[[int], float]:
    """A preset's schedule (`TrainSpec`: warmup_steps, max_steps, lr, min_lr)."""
    t = preset.train
    return warmup_cosine(t.warmup_steps, t.max_steps, t.min_lr / t.lr)
