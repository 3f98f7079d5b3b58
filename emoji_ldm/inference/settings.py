"""Sampler settings: the one type for steps, guidance, seed, scheduler, size and count.

`generate`, `bulk`, the service's request bodies and every other caller of the
sampler take a `SamplerSettings` (or validate their fields with `check`), so
the limits and the error text are the same wherever a user types them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import SCHEDULERS

MAX_STEPS = 1000
MAX_COUNT = 64
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 500
DEFAULT_GUIDANCE = 5.0  # the guidance of a model whose card names none of its own


def model_guidance(card: dict) -> float:
    """The guidance a model is sampled at unless the caller sets one: its card's `guidance` (its preset's, written
    when it was exported: `pixel32` draws best at 2.5, docs/demo.md), else `DEFAULT_GUIDANCE`."""
    value = card.get("guidance")
    return DEFAULT_GUIDANCE if value is None else float(value)


def _check_size(value):
    return value is None or (isinstance(value, int) and value % 8 == 0 and 16 <= value <= 1024)


# field -> (is the value allowed, what it must be)
_RULES = {
    "negative_prompt": (lambda v: isinstance(v, str) and len(v) <= MAX_PROMPT_CHARS,
                        f"at most {MAX_PROMPT_CHARS} characters"),
    "steps": (lambda v: isinstance(v, int) and 1 <= v <= MAX_STEPS, f"a whole number from 1 to {MAX_STEPS}"),
    "guidance": (lambda v: v is None or isinstance(v, (int, float)) and 0.0 <= v <= MAX_GUIDANCE,
                 f"from 0 to {MAX_GUIDANCE:g}"),
    "seed": (lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED, f"a whole number from 0 to {MAX_SEED}"),
    "scheduler": (lambda v: v in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}"),
    "size": (_check_size, "a multiple of 8 from 16 to 1024 pixels (or unset: the model's own size)"),
    "count": (lambda v: isinstance(v, int) and 1 <= v <= MAX_COUNT, f"a whole number from 1 to {MAX_COUNT}"),
}


def check(name: str, value):
    """`value` if it is allowed for sampler setting `name`, else a UserError with the shared wording."""
    ok, rule = _RULES[name]
    if isinstance(value, bool) or not ok(value):
        shown = value if not isinstance(value, str) or len(value) < 60 else value[:57] + "..."
        raise UserError(f"sampler setting {name} must be {rule}, got {shown!r}")
    return value


@dataclass(frozen=True)
class SamplerSettings:
    negative_prompt: str = opt("", help="what the images should not show")
    steps: int = opt(25, help=f"sampler steps, 1-{MAX_STEPS}")
    guidance: float | None = opt(None, help=f"classifier-free guidance scale, 0-{MAX_GUIDANCE:g} (default: the model's "
                                            f"own, from its model card; {DEFAULT_GUIDANCE:g} if it names none)")
    seed: int = opt(0, help="image k starts from the noise of seed + k")
    scheduler: str = opt("dpmpp", help=f"sampler: {' | '.join(SCHEDULERS)}")
    size: int | None = opt(None, help="image size in pixels, a multiple of 8 (default: the model's own)")
    count: int = opt(4, help=f"images, 1-{MAX_COUNT}")

    def __post_init__(self):
        if isinstance(self.guidance, int) and not isinstance(self.guidance, bool):
            object.__setattr__(self, "guidance", float(self.guidance))
        for f in dataclasses.fields(self):
            check(f.name, getattr(self, f.name))

    def replace(self, **changes) -> "SamplerSettings":
        return dataclasses.replace(self, **changes)

    def with_model_guidance(self, card: dict) -> "SamplerSettings":
        """These settings, with the model's own guidance (`model_guidance` of its card) where they set none."""
        return self if self.guidance is not None else self.replace(guidance=model_guidance(card))
