"""What one request or job may ask for, checked at the boundary before any model work: a 4xx naming the value.

The pixel budgets bound what a replica draws per request and what one process packages per job; the cost a key
may spend is the meter's (serve/meter.py).
"""

from __future__ import annotations

import re

from emoji_ldm.serve.errors import ApiError

MAX_REQUEST_PIXELS = 64 * 256 * 256  # one request's images x size^2: 64 at 256 px, 16 at 512, 4 at 1024
MAX_JOB_PIXELS = 4096 * 256 * 256  # one job's images x frames x size^2 (packaged in one process): 4096 at 256 px
PRIORITIES = ("high", "normal", "low")  # a job's place in the queue (serve/jobs/queue.py), highest first
MAX_CANCEL_AFTER_S = 30 * 86400
_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")                 # one part of a duration: 1h, 30m, 5s
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:h|ms|m|s))+|\d+(?:\.\d+)?")  # parts, or plain seconds
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def check_adapter(name: str | None, adapters: dict) -> None:
    """404 for an adapter this server does not serve (None: the base model)."""
    if name is not None and name not in adapters:
        known = ", ".join(sorted(adapters)) or "none (the operator passed no --adapter)"
        raise ApiError(404, f"unknown adapter {name!r}: this server has {known}", "adapter")


def check_pixels(images: int, size: int, max_batch_pixels: int, own_size: bool = False) -> None:
    """422 on `size` for what the GPU path must not draw: an image of the size asked over what a pipeline call
    holds (`max_batch_pixels`), or `images` (a request's images x frames; 0: not counted, a job) over the
    per-request budget. `own_size`: the request gave no size, and `size` is the model's."""
    if size * size > max_batch_pixels and not own_size:  # the model's own size: one image a call, whatever it is
        most = int(max_batch_pixels ** 0.5) // 8 * 8
        raise ApiError(422, f"size: one image of {_named(size, own_size)} is {size * size} pixels, more than one "
                            f"pipeline call on this server draws ({max_batch_pixels}, args.max_batch_pixels): ask "
                            f"for a size of at most {most}", "size")
    _check_total(images, size, own_size, MAX_REQUEST_PIXELS, f"one request may draw ({MAX_REQUEST_PIXELS})",
                 "send a job")


def check_job_pixels(images: int, size: int, own_size: bool = False) -> None:
    """422 on `size` for a job (`images`: its images x frames) over what one job may hold: its result is packaged
    by one process."""
    _check_total(images, size, own_size, MAX_JOB_PIXELS,
                 f"one job may hold ({MAX_JOB_PIXELS}, 4096 images of 256 px)", "split the job")


def _named(size: int, own_size: bool) -> str:
    return f"{size} px" + (" (the model's own size)" if own_size else "")


def _check_total(images: int, size: int, own_size: bool, limit: int, whole: str, otherwise: str) -> None:
    """422 on `size` when `images` of `size` px are more pixels than `limit` (`whole`: what holds them)."""
    if images * size * size > limit:
        raise ApiError(422, f"size: {images} images of {_named(size, own_size)} are {images * size * size} pixels, "
                            f"more than {whole}: ask for fewer or smaller images, or {otherwise}", "size")


def check_priority(priority: str, key) -> None:
    """A key asks for at most its `max_priority` (a server without keys: any)."""
    if key is not None and PRIORITIES.index(priority) < PRIORITIES.index(key.max_priority):
        raise ApiError(403, f"priority {priority!r} is above this key's max_priority {key.max_priority!r}: send "
                            f"{key.max_priority!r} or lower, or ask the operator for a key that may", "priority")


def cancel_after(header: str | None) -> float | None:
    """The `Cancel-After` header (a duration: `90s`, `5m`, `1h30m`, or seconds) as an epoch deadline; None
    without one; a 400 naming it otherwise. A job still drawing at its deadline is cancelled as a DELETE is."""
    import time

    if header is None or not header.strip():
        return None
    text = header.strip()
    seconds = None
    if _DURATION.fullmatch(text):
        parts = _PART.findall(text)
        seconds = sum(float(n) * _UNITS[u] for n, u in parts) if parts else float(text)
    if seconds is None or not 1 <= seconds <= MAX_CANCEL_AFTER_S:
        raise ApiError(400, f"Cancel-After {header[:40]!r} is not a duration from 1 s to 30 days: send e.g. "
                            "90s, 5m or 1h30m", "Cancel-After")
    return time.time() + seconds
