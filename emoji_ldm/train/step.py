"""One training step of the latent diffusion UNet: noise, forward, loss, backward, optimizer.

The same `training_step` runs inside the Ray Train workers (driving a
DeepSpeed engine) and in a single plain process (`PlainEngine` around a bare
module: `emoji-ldm train-step-check`, the check to run on a GPU node). It
knows nothing of ranks; the caller places tensors on its device once.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def diffusion_target(noise_scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v), as in diffusers' scripts."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(x0, eps, t)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def training_step(engine, noise_scheduler, latents: torch.Tensor, text: torch.Tensor, empty: torch.Tensor,
                  caption_dropout: float, prediction_type: str, dtype: torch.dtype) -> torch.Tensor:
    """One micro-batch on the engine's device; returns the (detached) loss.

    latents (B, C, h, w) and text (B, L, D) float32 on the device; `empty` (L, D)
    is the empty caption's embedding. `engine` is a DeepSpeed engine or a
    `PlainEngine`: called like the UNet, then `.backward(loss)` and `.step()`.
    """
    drop = torch.rand(len(latents)) < caption_dropout  # on the CPU generator: the same draws on every device
    cond = text.clone()
    cond[drop.to(text.device)] = empty  # classifier-free guidance: learn the unconditional too
    eps = torch.randn_like(latents)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, eps, t)  # (B, C, h, w)
    pred = engine(noisy.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
    loss = torch.nn.functional.mse_loss(pred.float(), diffusion_target(noise_scheduler, latents, eps, t,
                                                                       prediction_type).float())
    engine.backward(loss)
    engine.step()
    return loss.detach()


class PlainEngine:
    """The part of a DeepSpeed engine's interface that `training_step` uses, around a bare module."""

    def __init__(self, module, optimizer, lr_scheduler, grad_clip: float, params):
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.grad_clip, self.params = grad_clip, list(params)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
