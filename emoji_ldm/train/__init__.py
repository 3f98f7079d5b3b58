"""Training: encode a dataset into a latent table, then train the UNet on it with Ray Train.

Input: an emoji dataset version (encode, train-vae) or a latent table version
(train) and a model preset (`emoji_ldm.models.presets`). Output: a latent
Delta table (`encode.py`), the preset's own VAE (`vae.py`, stage 1 of `tiny`),
and a run folder with checkpoints, samples, metrics and the exported diffusers
pipeline + model card (`ldm.py`, `export.py`).

Entry points: `encode.encode(EncodeConfig)`, `vae.train_vae(VAETrainConfig)`,
`ldm.train(TrainConfig)` (`emoji-ldm encode | train-vae | train`). The
distributed wiring (Ray Train workers, DeepSpeed ZeRO, checkpoints) lives
here; the model code it drives (`emoji_ldm.models`) knows nothing of ranks.
"""
