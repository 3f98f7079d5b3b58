"""`eval --gpu` measures in fp32, as on the CPU: the dtype its pipeline loads in, with CUDA faked (no GPU here)."""

from __future__ import annotations

import pytest
import torch

from emoji_ldm.eval.evaluate import EvalConfig, model_pipeline


class _Pipe:
    """What load_pipeline touches of a StableDiffusionPipeline."""

    class scheduler:  # noqa: N801
        config: dict = {}

    def set_progress_bar_config(self, **kwargs):
        pass

    def to(self, device):
        self.device = device
        return self


@pytest.mark.parametrize("use_gpu, device", [(True, "cuda"), (False, "cpu")])
def test_eval_loads_its_pipeline_in_fp32(monkeypatch, use_gpu, device):
    import diffusers

    import emoji_ldm.inference.sampler as sampler
    import emoji_ldm.models.builders as builders

    loaded = {}

    class StableDiffusionPipeline:  # stands in for diffusers' (whose import alone takes seconds)
        @staticmethod
        def from_pretrained(folder, **kwargs):
            loaded.update(kwargs)
            return _Pipe()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sampler, "model_folder", lambda uri: "/models/m")
    monkeypatch.setattr(builders, "sampling_scheduler", lambda name, config: None)
    monkeypatch.setattr(diffusers, "StableDiffusionPipeline", StableDiffusionPipeline, raising=False)
    pipe = model_pipeline(EvalConfig(model="/models/m", data="/latents", use_gpu=use_gpu))
    assert pipe.device == device
    assert loaded["torch_dtype"] == torch.float32, f"eval on {device} loads its pipeline in {loaded['torch_dtype']}"
