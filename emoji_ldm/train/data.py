"""Data helpers shared by the training stages (Ray Data batches -> tensors)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from emoji_ldm.imaging import KEY_COLOUR


def decode_images(batch: dict, size: int, channels: int = 3, key_colour: str = KEY_COLOUR) -> dict:
    """Ray Data batch: PNG bytes -> float16 pixels in [-1, 1], (B, channels, size, size).

    `channels` is the VAE's: 4 keeps alpha (straight RGBA; an RGB image is opaque); 3 composites any
    transparency onto `key_colour` (a 3-channel model learns emoji on that colour, and inference keys it).
    """
    from emoji_ldm.imaging import model_pixels

    pixels = [model_pixels(Image.open(io.BytesIO(png)), size, channels, key_colour) for png in batch["image"]]
    out = {k: v for k, v in batch.items() if k != "image"}
    out["pixels"] = np.stack(pixels).astype(np.float16)  # (B, C, H, W)
    return out


def shard_to_numpy(shard, columns: list[str], batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Collect a worker's dataset shard into memory (small tables: latents, 32-64 px images)."""
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for c in columns:
            parts[c].append(batch[c])
    return {c: np.concatenate(v) if v else np.zeros((0,)) for c, v in parts.items()}
