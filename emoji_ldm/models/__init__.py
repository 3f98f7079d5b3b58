"""Models: presets (typed configs) and builders of diffusers/transformers components.

Input: a preset name and overrides. Output: UNet, VAE, text encoder, schedulers.
Public entry points: `get_preset`, `with_overrides`, `build_unet`, `build_vae`,
`load_text_encoder`, `encode_text`, `noise_scheduler`, `sampling_scheduler`.
Model code here never imports Ray or DeepSpeed.
"""
