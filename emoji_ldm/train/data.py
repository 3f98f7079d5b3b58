"""Data helpers shared by the training stages (Ray Data batches -> tensors)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_images(batch: dict, size: int) -> dict:
    """Ray Data batch: PNG bytes -> float16 pixels in [-1, 1], (B, 3, size, size)."""
    pixels = []
    for png in batch["image"]:
        img = Image.open(io.BytesIO(png)).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        pixels.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)  # (3, H, W)
    out = {k: v for k, v in batch.items() if k != "image"}
    out["pixels"] = np.stack(pixels).astype(np.float16)  # (B, 3, H, W)
    return out


def shard_to_numpy(shard, columns: list[str], batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Collect a worker's dataset shard into memory (small tables: latents, 32-64 px images)."""
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for c in columns:
            parts[c].append(batch[c])
    return {c: np.concatenate(v) if v else np.zeros((0,)) for c, v in parts.items()}
