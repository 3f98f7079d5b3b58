"""What each API key may spend, decided in one place for every ingress replica: its cost budget and its
concurrent-jobs quota.

    Ingress replica ─┐
    Ingress replica ─┼─► the meter: one detached, named Ray actor (`emoji-ldm-meter-2`, namespace
    Ingress replica ─┘   `emoji-ldm-jobs`, get_if_exists), a plain (non-async) actor: Ray runs its calls
                         one at a time, so "is there room? then take it" is one step that no other
                         request can come between (the job quota was check-then-act before: ten concurrent
                         posts with --max-jobs 1 all started)

Cost: a request costs images x steps x (size/64)^2 units (the size drawn: the model's own when the request gives
none; x 1 at 64 px and below), taken
from a token bucket per key id that refills `ApiKey.cost_per_minute` units a minute and holds at most that
many. A request that costs more than the whole bucket can never pass; one that costs more than what is left
waits for the refill (429 with Retry-After). Checked before any model work.

Jobs: `admit(owner, job_id, quota)` counts the owner's unfinished jobs (its live runner actors, `job:<owner>:<id>`,
and its places in the job queue, jobs/queue.py) plus the jobs it admitted that are in neither yet, and admits the
job only below the quota. Those are the truth (a job that ends takes its runner and its place with it), so the
meter keeps nothing that must be released for the count to be right, and a meter that is lost and started again
counts right from its first call. A job id that is already running or admitted is admitted again (an idempotent
replay, a resume).

One cost model for every route: a key's `cost_budget` is a second bucket (`budget:<key id>`, refilled at the same
`cost_per_minute`, holding at most `cost_budget` units) that every request and every job draws from. A request
also needs room in its minute bucket (at most a minute's budget a minute, as before); a job is charged its whole
cost at admission (`admit_job`: images x frames x (1 + redraws) x steps x (size/64)^2, jobs/quota.py), in the same
step as its jobs quota and the key's stored-bytes quota, and what it did not draw is refunded on cancel (`refund`,
once per job).
"""

from __future__ import annotations

import time

from emoji_ldm.serve.placement import NAMESPACE, unfinished_jobs

# the name changes with the actor's methods: an ingress of this version never asks an older meter left running on
# the cluster (detached, it outlives a `serve deploy`) for a method it lacks
METER_NAME = "emoji-ldm-meter-2"
SETTLE_S = 120.0   # an admitted job whose runner never came up stops counting after this long
UNIT_PIXELS = 64 * 64
STORED_TTL_S = 60.0  # how old an ingress's measurement of a key's stored bytes may be (jobs/quota.py)


def cost_units(images: int, steps: int, size: int | None = None) -> float:
    """What a request costs: images x steps, x (size/64)^2 for images larger than 64 px (`size`: the size drawn,
    the model's own when the request gives none)."""
    return float(images * steps) * max(1.0, (size or 0) ** 2 / UNIT_PIXELS)


class Meter:
    """The decisions; as a Ray actor through `meter_actor()`, in a test as it is (a clock and the live runners
    injected)."""

    def __init__(self, clock=time.monotonic, live=unfinished_jobs):
        self.clock, self.live = clock, live
        self.buckets: dict[str, tuple[float, float]] = {}   # bucket -> (units left, when)
        self.admitted: dict[str, dict[str, float]] = {}     # owner -> job id -> when admitted
        self.charged: dict[str, dict[str, tuple[float, float]]] = {}  # owner -> job id -> (units, when)
        self.job_bytes: dict[str, dict[str, tuple[int, float]]] = {}  # owner -> job id -> (its bound, ended at)

    def _level(self, bucket: str, most: float, per_minute: float, now: float) -> float:
        left, at = self.buckets.get(bucket, (float(most), now))
        return min(float(most), left + (now - at) * per_minute / 60.0)

    def spend(self, owner: str, cost: float, per_minute: float, budget: float | None = None) -> float:
        """0.0: taken from the owner's bucket (and from its `budget:` bucket, holding `budget`, when given).
        > 0: the seconds until both hold `cost` (nothing taken). -1.0: more than the minute bucket ever holds."""
        if cost > per_minute or (budget is not None and cost > budget):
            return -1.0
        now = self.clock()
        left = self._level(owner, per_minute, per_minute, now)
        room = left if budget is None else min(left, self._level(f"budget:{owner}", budget, per_minute, now))
        if room < cost:
            self.buckets[owner] = (left, now)
            return max(1.0, (cost - room) * 60.0 / per_minute)
        self.buckets[owner] = (left - cost, now)
        if budget is not None:
            self.buckets[f"budget:{owner}"] = (self._level(f"budget:{owner}", budget, per_minute, now) - cost, now)
        return 0.0

    def admit_job(self, owner: str, job_id: str, quota: int | None, cost: float, per_minute: float,
                  budget: float, job_bytes: int, stored: int, max_bytes: int) -> dict:
        """A job's admission in one step: the jobs quota, the stored-bytes quota (`stored`: what the owner's
        folder held when last measured; the bounds of its jobs running, admitted or ended since are added) and its
        whole cost from the `budget:` bucket. {"ok": True}, or {"refused": "jobs" | "bytes" | "cost", ...}
        with what it would take and what is left. A job already charged (a replay) is admitted as it is."""
        now = self.clock()
        if job_id in self.charged.get(owner, {}):
            return {"ok": self.admit(owner, job_id, quota)}
        bucket = f"budget:{owner}"
        left = self._level(bucket, budget, per_minute, now)
        if cost > budget or left < cost:
            return {"refused": "cost", "cost": cost, "left": left, "budget": budget,
                    "wait_s": None if cost > budget else max(1.0, (cost - left) * 60.0 / per_minute)}
        live = self.live(owner)
        held = stored + self._bytes_held(owner, live, now)
        if held + job_bytes > max_bytes:
            return {"refused": "bytes", "bytes": job_bytes, "held": held, "max_bytes": max_bytes}
        if not self.admit(owner, job_id, quota, live):
            return {"refused": "jobs"}
        self.buckets[bucket] = (left - cost, now)
        self.charged.setdefault(owner, {})[job_id] = (cost, now)
        self.job_bytes.setdefault(owner, {})[job_id] = (job_bytes, float("inf"))
        self._forget(owner, budget / per_minute * 60.0, now)
        return {"ok": True}

    def _bytes_held(self, owner: str, live: set[str], now: float) -> int:
        """The bounds of the owner's jobs whose output a measurement may not hold yet: running or admitted, or
        ended within the last STORED_TTL_S (a measurement is at most that old)."""
        live = live | set(self.admitted.get(owner, {}))
        jobs = self.job_bytes.get(owner, {})
        for job_id, (size, ended) in list(jobs.items()):
            if job_id in live:
                continue
            if ended == float("inf"):
                jobs[job_id] = (size, now)  # seen gone now: counted for STORED_TTL_S more
            elif now - ended >= STORED_TTL_S:
                del jobs[job_id]
        return sum(size for size, _ in jobs.values())

    def _forget(self, owner: str, refill_s: float, now: float) -> None:
        """Charges older than a full refill of the budget: a refund of them would change nothing."""
        charged = self.charged.get(owner, {})
        for job_id in [j for j, (_, at) in charged.items() if now - at > refill_s]:
            del charged[job_id]

    def refund(self, owner: str, job_id: str, share: float, per_minute: float, budget: float) -> float:
        """Give back `share` (0-1: the part not drawn) of a cancelled job's charge, once; returns the units."""
        units, _ = self.charged.get(owner, {}).pop(job_id, (0.0, 0.0))
        units *= min(1.0, max(0.0, share))
        if units:
            now = self.clock()
            bucket = f"budget:{owner}"
            self.buckets[bucket] = (min(float(budget), self._level(bucket, budget, per_minute, now) + units), now)
        return units

    def admit(self, owner: str, job_id: str, quota: int | None, live: set[str] | None = None) -> bool:
        """Admit one more job of `owner` if it has fewer than `quota` live or admitted (None: no quota)."""
        now = self.clock()
        live = self.live(owner) if live is None else live
        pending = {j: t for j, t in self.admitted.get(owner, {}).items() if j not in live and now - t < SETTLE_S}
        self.admitted[owner] = pending
        if job_id in live or job_id in pending:
            return True
        if quota is not None and len(live) + len(pending) >= quota:
            return False
        pending[job_id] = now
        return True

    def started(self, owner: str, job_id: str) -> None:
        """The job's runner is up (it is counted as live from now on), or it never will be: forget the
        admission."""
        self.admitted.get(owner, {}).pop(job_id, None)

    def ping(self) -> bool:
        return True


_handle = None


async def ask(method: str, *args):
    """Call the meter actor; a handle whose actor is gone for good (killed by hand) is dropped and the call made
    once more on the one that `get_if_exists` then finds or makes."""
    global _handle
    from ray.exceptions import RayActorError

    try:
        return await getattr(meter_actor(), method).remote(*args)
    except RayActorError:
        _handle = None
        return await getattr(meter_actor(), method).remote(*args)


def meter_actor():
    """This process's handle on the one meter actor (made by whoever asks first)."""
    global _handle
    if _handle is None:
        import ray

        _handle = ray.remote(Meter).options(name=METER_NAME, namespace=NAMESPACE, lifetime="detached",
                                            get_if_exists=True, num_cpus=0, max_restarts=-1,
                                            max_task_retries=-1).remote()
    return _handle
