"""What every check of `make gpu-check` shares: the device context, the skip rule, the report's device and versions."""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

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
