"""The held-out split: which rows training never sees (by content hash, so stable across versions)."""

from __future__ import annotations


def split_of(content_id: str, val_percent: int = 10) -> str:
    """Held-out split by content hash: stable across dataset versions."""
    return "val" if int(content_id[:8], 16) % 100 < val_percent else "train"
