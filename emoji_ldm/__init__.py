"""emoji-ldm: versioned emoji datasets, latent diffusion training and bulk generation on Ray."""

__version__ = "0.1.0"
