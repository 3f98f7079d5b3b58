"""Training: encode a dataset into a latent table, then train on it with Ray Train and DeepSpeed.

Input: an emoji dataset version (encode, train-vae, dreambooth's photos) or a latent table version (train) and a
model preset (`emoji_ldm.models.presets`). Output: a latent Delta table (`encode.py`), the preset's own VAE
(`vae.py`, stage 1 of `tiny`), and run folders with checkpoints, samples, metrics and the exported diffusers
pipeline + model card (`ldm.py`, `dreambooth.py`, `export.py`).

Entry points: `encode.encode(EncodeConfig)`, `vae.train_vae(VAETrainConfig)`, `ldm.train(TrainConfig)`,
`dreambooth.dreambooth(DreamBoothConfig)` (`emoji-ldm encode | train-vae | train | dreambooth`). Every recipe
runs in one loop (`loop.py`) on one harness (`runner.py`, `checkpoint.py`, `metrics.py`, `ema.py`); the model
code it drives (`emoji_ldm.models`) knows nothing of ranks.
"""
