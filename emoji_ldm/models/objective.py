"""The diffusion objective: what the UNet learns to predict. Shared by training and evaluation."""

from __future__ import annotations

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def diffusion_target(noise_scheduler, x0, eps, t, prediction_type: str):
    """What the UNet learns to predict, as in diffusers' scripts: the noise (epsilon), the velocity (v) or the clean
    latents (sample). x0, eps (B, C, h, w), t (B,) -> the target (B, C, h, w)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(x0, eps, t)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
