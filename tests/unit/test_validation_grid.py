"""The validation grids of `train` (train/ldm.py `_Validation`): drawn in the training dtype, with the VAE kept in
fp32 under fp16 as inference keeps it (the SD VAE's decoder overflows in fp16). The pipeline is a stand-in with
real modules; its dtypes are read where the grid draws."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch


class _Pipe(torch.nn.Module):
    """What the grid needs of a StableDiffusionPipeline: `to(device, dtype)`, a UNet and a VAE."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.vae = unet, torch.nn.Conv2d(4, 3, 1)


@pytest.mark.parametrize("dtype,vae_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float32)])
def test_the_grid_keeps_the_vae_fp32_under_fp16(dtype, vae_dtype):
    from emoji_ldm.models.builders import build_unet, configure_trainable
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train import ldm
    from emoji_ldm.train.ema import make_ema
    from emoji_ldm.train.runner import Worker

    preset = get_preset("tiny")
    ema = make_ema(configure_trainable(build_unet(preset), preset), preset.train)
    seen = {}

    def draw(pipe, prompts, **kwargs):
        seen.update(unet=pipe.unet.dtype, vae=next(pipe.vae.parameters()).dtype)
        return []

    worker = Worker(0, 1, torch.device("cpu"), {torch.float16: "fp16"}.get(dtype, "no"), dtype)
    validation = ldm._Validation(preset, SimpleNamespace(vae="vae", image={}), worker)
    with mock.patch("emoji_ldm.train.export.assemble_pipeline", lambda unet, preset, vae: _Pipe(unet)), \
            mock.patch("emoji_ldm.inference.sampler.run_pipeline", draw), \
            mock.patch("emoji_ldm.inference.sampler.image_grid", lambda images, prompts: None):
        validation.grid(ema, 1, mock.Mock())
    assert seen == {"unet": dtype, "vae": vae_dtype}
