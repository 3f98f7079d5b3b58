"""What a durable job costs a key, decided at admission: its GPU work against the key's cost budget and its output
against the key's stored-bytes quota (the decision itself is `Meter.admit_job`, serve/meter.py, one step on the
actor every ingress replica shares).

    cost  = images x frames x (1 + redraws) x steps x (size/64)^2   the units /v1/generate and /v1/emoji-sets pay
    bytes = images x frames x size^2 x 4 x 2 + 64 KiB               raw RGBA, twice (the PNGs and the zip), at most

A PNG is never larger than its raw RGBA by more than a few header bytes, so `bytes` bounds a job's output however
its images compress (pure noise, `steps: 1`, does not). A key's stored bytes are measured by listing its jobs
folder (`<jobs_uri>/<key id>/`, streamed), at most once every `STORED_TTL_S` per ingress replica; the meter adds
the bounds of the key's jobs that a measurement that old may not hold yet.
"""

from __future__ import annotations

import threading
import time

from emoji_ldm.serve.errors import ApiError
from emoji_ldm.serve.meter import STORED_TTL_S, cost_units

TARGET_SIZE = 128  # slack, discord and github targets: every file at 128 x 128 (serve/sets.py)
MIN_SIZE = 64  # the size a job's bytes are bounded at, at least
OVERHEAD_BYTES = 64 * 1024  # request.json, state.json, manifest.json, the zip's directory


def redraws(body) -> int:
    """Redraws a job may make per image: its `max_redraws` when it asks for a legibility floor."""
    return body.max_redraws if body.min_legibility is not None else 0


def job_cost(body, drawn: int) -> float:
    """The cost units of a job drawn at `drawn` px, every redraw it may make included."""
    frames = max(1, body.animation.frames)
    return cost_units(body.images() * frames * (1 + redraws(body)), body.steps, drawn)


def job_bytes(body, drawn: int) -> int:
    """The most bytes a job's result may take on storage."""
    side = max(drawn, MIN_SIZE, TARGET_SIZE if body.target != "raw" else 0)  # drawn 0: a model card without a size
    return body.images() * max(1, body.animation.frames) * side * side * 4 * 2 + OVERHEAD_BYTES


class StoredBytes:
    """Each key's stored bytes under `<jobs_uri>/<key id>/`, measured at most every STORED_TTL_S (`clock`)."""

    def __init__(self, jobs_uri: str, clock=time.monotonic):
        self.jobs_uri, self.clock = jobs_uri, clock
        self._seen: dict[str, tuple[int, float]] = {}  # owner -> (bytes, when measured)
        self._lock = threading.Lock()

    def of(self, owner: str) -> int:
        """The owner's bytes (blocking: call it off the event loop)."""
        with self._lock:
            held = self._seen.get(owner)
        if held is not None and self.clock() - held[1] < STORED_TTL_S:
            return held[0]
        when = self.clock()  # before the listing: the meter counts jobs ended since as not in it
        total = measure(self.jobs_uri, owner)
        with self._lock:
            self._seen[owner] = (total, when)
        return total


def measure(jobs_uri: str, owner: str) -> int:
    from emoji_ldm.serve.jobs.retention import iter_sized
    from emoji_ldm.store.uri import join

    return sum(size for _, _, size in iter_sized(join(jobs_uri, owner)))


def refusal(decision: dict, key) -> ApiError:
    """The 429 for a job the meter did not admit: what it would take and what is left, in words and figures."""
    why = decision["refused"]
    if why == "jobs":
        return ApiError(429, f"key {key.name!r} has {key.max_jobs} job(s) running, its quota: retry when one ends",
                        headers={"Retry-After": "30"}, extra={"quota": "jobs", "max_jobs": key.max_jobs})
    if why == "bytes":
        left = max(0, decision["max_bytes"] - decision["held"])
        return ApiError(429, f"this job may store up to {decision['bytes']} bytes and key {key.name!r} has "
                             f"{left} of its {decision['max_bytes']} stored bytes left: download and delete "
                             "finished results, wait for retention, or ask for fewer or smaller images",
                        extra={"quota": "stored_bytes", "would_store_bytes": decision["bytes"],
                               "stored_bytes_left": left, "max_stored_bytes": decision["max_bytes"]})
    cost, left, wait = decision["cost"], decision["left"], decision["wait_s"]
    extra = {"quota": "cost", "cost_units": cost, "cost_units_left": int(left), "cost_budget": decision["budget"]}
    if wait is None:
        return ApiError(429, f"this job costs {cost:g} units (images x frames x (1 + redraws) x steps x "
                             f"(size/64)^2), more than key {key.name!r} may ever hold ({decision['budget']}): "
                             "split it into smaller jobs", extra=extra)
    return ApiError(429, f"this job costs {cost:g} units and key {key.name!r} has {int(left)} left of its "
                         f"{decision['budget']}: it fits in {wait:.0f} s", extra=extra,
                    headers={"Retry-After": str(int(wait + 0.999))})
