"""The training step without Ray: the loss targets by prediction type, a real step, the step check."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from emoji_ldm.commands import STAGES, find, parse_config
from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import get_preset
from emoji_ldm.train.step import diffusion_target


def test_targets_follow_the_prediction_type():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(diffusion_target(sched, x0, eps, t, "epsilon"), eps)
    alpha_bar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0  # by hand: v = sqrt(a) eps - sqrt(1 - a) x0
    assert torch.allclose(diffusion_target(sched, x0, eps, t, "v_prediction"), v, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(sched, x0, eps, t, "sample")
    with pytest.raises(UserError, match="noise.prediction_type must be epsilon or v_prediction, got 'sample'"):
        get_preset("tiny", {"noise.prediction_type": "sample"})


def test_step_check_runs_the_real_step():
    from emoji_ldm.train.check import report, step_check

    config = parse_config(find(("train-step-check",)), ["--preset", "tiny", "--steps", "1", "--warmup", "0",
                                                         "--batch-size", "2", "--set", "unet.block_out_channels=32,32",
                                                         "--set", "noise.prediction_type=v_prediction"])
    result = step_check(config)
    assert result["images_per_s"] > 0 and result["flops_per_step"] > 0 and 0 < result["mfu"] < 5
    assert "train-step-check: preset tiny on cpu" in report(result)
    assert "train" in STAGES  # the step check is no stage: it needs no cluster
    bf16 = step_check(parse_config(find(("train-step-check",)), [
        "--steps", "1", "--warmup", "0", "--batch-size", "2", "--set", "unet.block_out_channels=32,32",
        "--precision", "bf16"]))  # the mixed-precision path, on CPU
    assert bf16["precision"] == "bf16 autocast" and bf16["loss"] == bf16["loss"]  # a number, not NaN
