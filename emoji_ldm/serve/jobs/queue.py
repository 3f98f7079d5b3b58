"""The durable jobs' fair queue: which job draws next, its place in line, and its ETA.

    POST /v1/jobs ──► Ingress ──► JobQueue.submit: writes request.json and the `_active` marker (the one writer:
                                    │  calls run one at a time, so ten duplicate posts make one job), then waits
                                    ▼  in line, holding no process
                      the queue: per priority (high > normal > low), one line per key, served round-robin:
                                    │  a key with one job waits for at most one job of each other key, never
                                    ▼  behind another key's thousand
                      a free slot (`job_slots`, the cluster-wide cap on job drawers) ──► the job's JobRunner
                                    │  (runner.py) starts; when it ends it gives the slot back (`release`)
                                    ▼
                      the images/s the slots drew, measured as jobs end: each waiting job's ETA

One detached, named actor (`emoji-ldm-queue-1`, namespace `emoji-ldm-jobs`), a plain actor: Ray runs its calls one
at a time, and its own thread (`tick`, each TICK_S) ends waiting jobs past their `Cancel-After` deadline, notices
runners that are gone, and fills free slots. It keeps the line in memory only: one that is lost and started again
counts the live runners as running, and the ingresses' sweeps (and each job's next GET) put the other unfinished
jobs back in line, in the order they were made (their `_active` markers on shared storage are the truth).

A cancelled or expired job that is still waiting never takes a slot: the queue writes its end at once, or, when
its webhook waits for that end, a lane of its own (CLOSING_SLOTS runners at a time) starts its runner to do it.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import logging
import threading
import time
from collections import Counter, deque

from emoji_ldm.serve.jobs import store
from emoji_ldm.serve.jobs.runner import start_runner
from emoji_ldm.serve.limits import PRIORITIES
from emoji_ldm.serve.placement import NAMESPACE, QUEUE_NAME, live_runners, runner
from emoji_ldm.serve.schemas import JobRequest
from emoji_ldm.store.artifacts import delete, write_bytes, write_json
from emoji_ldm.store.uri import join

logger = logging.getLogger(__name__)

TICK_S = 0.5
CHECK_RUNNERS_S = 5.0    # how often the queue asks whether each running job's runner is still there
GRACE_S = 10.0           # a runner just started is not looked for before this long
CLOSING_SLOTS = 4        # runners ending cancelled or expired jobs that never started, at once
RATE_MEMORY = 0.3        # weight of the newest job in the measured images/s (an exponential mean)


@dataclasses.dataclass
class Waiting:
    owner: str
    job_id: str
    priority: int            # index in PRIORITIES
    images: int
    created: str             # request.json's created_at: the order within a key's line
    deadline: float | None   # epoch seconds (Cancel-After), or None
    spec: object = None      # the JobSpec its runner starts with
    arrival: int = 0         # the queue's count when it came: the order among jobs made in the same second

    @property
    def key(self) -> tuple[str, int, str]:
        return self.created, self.arrival, self.job_id


@dataclasses.dataclass
class Running:
    owner: str
    job_id: str
    images: int
    since: float             # monotonic
    spec: object = None      # None: found running when the queue started (a runner of before its restart)


class FairLine:
    """The waiting jobs: per priority, one line per owner, oldest first. Plain Python (tested as it is).

    Fair share: the next job is the oldest of the owner, among those waiting at the highest priority, with the
    fewest jobs running now, then the one served least recently (`running`, `last`: owner -> jobs running, and the
    turn it was last served), then the one that came first. With owners A (50 jobs) and B (1) and one slot, B's
    job starts as soon as A's first job ends, whenever B came."""

    def __init__(self):
        self.levels: list[dict[str, list[Waiting]]] = [{} for _ in PRIORITIES]  # owner -> jobs; keeps arrival order
        self.where: dict[str, Waiting] = {}

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.where

    def push(self, entry: Waiting) -> None:
        line = self.levels[entry.priority].setdefault(entry.owner, [])
        bisect.insort(line, entry, key=lambda e: e.key)
        self.where[entry.job_id] = entry

    def remove(self, job_id: str) -> Waiting | None:
        entry = self.where.pop(job_id, None)
        if entry is not None:
            owners = self.levels[entry.priority]
            owners[entry.owner].remove(entry)
            if not owners[entry.owner]:
                del owners[entry.owner]
        return entry

    def pop(self, running: dict[str, int], last: dict[str, int]) -> Waiting | None:
        for owners in self.levels:
            if owners:
                owner = min(owners, key=lambda o: (running.get(o, 0), last.get(o, -1)))  # ties: the first to come
                return self.remove(owners[owner][0].job_id)
        return None

    def order(self, running: dict[str, int], last: dict[str, int]) -> list[Waiting]:
        """Every waiting job in the order `pop` gives them if nothing joins and no running job ends."""
        running, last, out = dict(running), dict(last), []
        turn = max(last.values(), default=0)
        for owners in self.levels:
            heap = [(running.get(o, 0), last.get(o, -1), i, o) for i, o in enumerate(owners)]
            heapq.heapify(heap)
            taken = dict.fromkeys(owners, 0)
            while heap:
                count, _, i, owner = heapq.heappop(heap)
                out.append(owners[owner][taken[owner]])
                taken[owner] += 1
                turn += 1
                last[owner] = turn
                if taken[owner] < len(owners[owner]):
                    heapq.heappush(heap, (count + 1, turn, i, owner))
            for owner, n in taken.items():
                running[owner] = running.get(owner, 0) + n
        return out

    def of(self, owner: str) -> set[str]:
        return {e.job_id for owners in self.levels for e in owners.get(owner, ())}


class JobQueue:
    """The queue's state and its decisions; as a Ray actor through `queue_actor()`. `start` starts a job's runner
    (runner.start_runner; a test passes its own), `alive(owner, job_id)` says whether it is still there."""

    def __init__(self, slots: int = 1, start=start_runner, alive=None, clock=time.monotonic, ticking: bool = True):
        self.slots = max(1, int(slots))
        self.start = start
        self.alive = alive or (lambda owner, job_id: runner(owner, job_id) is not None)
        self.clock = clock
        self.line = FairLine()
        self.running: dict[str, Running] = {}
        self.closing: dict[str, Running] = {}
        self.to_close: deque[Waiting] = deque()
        self.deadlines: list[tuple[float, str]] = []   # a heap; entries of jobs no longer waiting are skipped
        self.rate: float | None = None                  # images/s one slot draws, measured as jobs end
        self.granted = 0                                # jobs started so far
        self.last: dict[str, int] = {}                  # owner -> the turn its last job started (fair share)
        self.turns: deque[tuple[int, str, str]] = deque(maxlen=1000)  # (turn, owner, job id), newest last
        self._places: dict[str, tuple[int, int]] | None = None  # job id -> (position, images ahead), until a change
        self._arrivals = itertools.count()              # created_at has whole seconds: this orders a key's jobs
        self._lock = threading.RLock()
        self._checked = clock()
        if ticking:  # the live runners of before a restart hold their slots until they end
            for owner, job_id in live_runners():
                self.running[job_id] = Running(owner, job_id, 0, clock())
            threading.Thread(target=self._tick_forever, name="job-queue", daemon=True).start()

    # --- the ingress's calls ------------------------------------------------------------------

    def configure(self, slots: int) -> int:
        with self._lock:
            self.slots = max(1, int(slots))
            self._fill()
            return self.slots

    def submit(self, spec, priority: str = "normal", deadline: float | None = None) -> str:
        """Make the job (its request.json and `_active` marker) if it is new, and put it in line unless it is
        running or has ended. Returns the body hash it was made with (the caller compares it with its own)."""
        with self._lock:
            request = store.read_request(spec.folder)
            if request is None:
                request = store.create_job(spec, PRIORITIES[PRIORITIES.index(priority)], deadline)
            job_id = spec.job_id
            if job_id in self.line or job_id in self.running or job_id in self.closing:
                return request["body_hash"]
            state = store.read_state(spec.folder) or {}
            if state.get("state") in store.ENDED:
                return request["body_hash"]
            entry = Waiting(spec.owner, job_id, PRIORITIES.index(request.get("priority", "normal")),
                            JobRequest.model_validate(request["body"]).images(), request["created_at"],
                            request.get("deadline"), spec, next(self._arrivals))
            self.line.push(entry)
            self._places = None
            if entry.deadline is not None:
                heapq.heappush(self.deadlines, (entry.deadline, job_id))
            self._fill()
            return request["body_hash"]

    def cancel(self, job_id: str) -> bool:
        """A waiting job, cancelled (its `cancel` file is written), ends now (`_close`). False: it was not
        waiting."""
        with self._lock:
            entry = self.line.remove(job_id)
            if entry is None:
                return False
            self._close(entry)
            self._places = None
            self._fill()
            return True

    def drop(self, job_id: str) -> None:
        """Forget a waiting job whose end was written without a runner (a revoked key's)."""
        with self._lock:
            self.line.remove(job_id)
            self._places = None

    def place(self, owner: str, job_id: str) -> dict | None:
        """{state: waiting, position, eta_s, priority}, {state: running}, or None: not in the queue (or not the
        owner's)."""
        with self._lock:
            if job_id in self.running or job_id in self.closing:
                return {"state": "running"}
            entry = self.line.where.get(job_id)
            if entry is None or entry.owner != owner:
                return None
            if self._places is None:  # the whole line's order, made once per change, not once per GET
                self._places, images = {}, 0
                for position, waiting in enumerate(self.line.order(self._running_of(), self.last)):
                    self._places[waiting.job_id] = (position, images)
                    images += waiting.images
            position, images = self._places[job_id]
            return {"state": "waiting", "position": position, "priority": PRIORITIES[entry.priority],
                    "eta_s": self._eta(images)}

    def unfinished(self, owner: str) -> set[str]:
        """The owner's job ids waiting, running or closing (the meter counts them against its jobs quota)."""
        with self._lock:
            return self.line.of(owner) | {j for j, r in (*self.running.items(), *self.closing.items())
                                          if r.owner == owner}

    def release(self, job_id: str, images: int, seconds: float) -> None:
        """A runner ended: its slot is free; `images` drawn in `seconds` feed the measured rate."""
        with self._lock:
            self.closing.pop(job_id, None)
            ran = self.running.pop(job_id, None)
            self._places = None
            if ran is not None and images > 0 and seconds > 0:
                rate = images / seconds
                self.rate = rate if self.rate is None else (1 - RATE_MEMORY) * self.rate + RATE_MEMORY * rate
            self._fill()

    def snapshot(self) -> dict:
        """What the queue holds now: for operators and tests."""
        with self._lock:
            return {"slots": self.slots, "waiting": len(self.line), "running": sorted(self.running),
                    "closing": sorted(self.closing), "rate": self.rate, "turns": list(self.turns)}

    # --- its own work -------------------------------------------------------------------------

    def _eta(self, images_ahead: int) -> float | None:
        if not self.rate:
            return None
        now = self.clock()
        left = sum(max(0.0, r.images - self.rate * (now - r.since)) for r in self.running.values())
        return round((images_ahead + left) / (self.rate * self.slots), 1)

    def _close(self, entry: Waiting, expired: bool = False) -> None:
        """End a job that never started: here, when no webhook waits for its end; else its runner starts in the
        closing lane, writes the end (it sees the cancel or the deadline) and sends the webhook."""
        if (entry.spec.body or {}).get("callback_url"):
            self.to_close.append(entry)
            return
        error = f"cancelled: its Cancel-After deadline ({store.iso(entry.deadline)}) passed" if expired else None
        store.end_unstarted(entry.spec, error)
        if expired and entry.spec.cost_per_minute:  # what it did not draw (all of it) back to the key's budget
            from emoji_ldm.serve.meter import meter_actor

            meter_actor().refund.remote(entry.owner, entry.job_id, 1.0, entry.spec.cost_per_minute,
                                        entry.spec.cost_budget)

    def _fill(self) -> None:
        """Start runners while there are free slots: the closing lane first (its own slots), then the line."""
        while self.to_close and len(self.closing) < CLOSING_SLOTS:
            entry = self.to_close.popleft()
            self._start(entry, self.closing)
        while len(self.running) < self.slots and (entry := self.line.pop(self._running_of(), self.last)) is not None:
            self._start(entry, self.running)

    def _running_of(self) -> Counter:
        return Counter(r.owner for r in self.running.values())

    def _start(self, entry: Waiting, into: dict) -> None:
        self._places = None
        into[entry.job_id] = Running(entry.owner, entry.job_id, entry.images, self.clock(), entry.spec)
        if into is self.running:
            self.granted += 1
            self.last[entry.owner] = self.granted
            self.turns.append((self.granted, entry.owner, entry.job_id))
        try:
            self.start(entry.spec)
        except Exception:  # logged; its slot is freed by the next check, and the job's next GET resubmits it
            logger.exception("starting the runner of job %s failed", entry.job_id)
            into.pop(entry.job_id, None)

    def tick(self) -> None:
        with self._lock:
            now = time.time()
            while self.deadlines and self.deadlines[0][0] <= now:
                _, job_id = heapq.heappop(self.deadlines)
                entry = self.line.remove(job_id)
                if entry is not None:
                    self._close(entry, expired=True)
                    self._places = None
            if self.clock() - self._checked >= CHECK_RUNNERS_S:
                self._checked = self.clock()
                for lane in (self.running, self.closing):
                    for job_id, ran in list(lane.items()):
                        if self.clock() - ran.since >= GRACE_S and not self.alive(ran.owner, job_id):
                            del lane[job_id]  # gone without a release (its node): its next GET or sweep resubmits
                            self._places = None
            self._fill()

    def _tick_forever(self) -> None:
        while True:
            time.sleep(TICK_S)
            try:
                self.tick()
            except Exception:  # logged; the next tick tries again
                logger.exception("the job queue's tick failed")


# --- the callers' side ------------------------------------------------------------------------

_handle = None
_slots = None  # what this process configured: a queue made again (the old one gone for good) gets it too


def queue_actor(slots: int | None = None):
    """This process's handle on the one queue actor (made by whoever asks first); `slots` configures it."""
    global _handle, _slots
    import ray

    _slots = slots or _slots
    if _handle is None:
        _handle = ray.remote(JobQueue).options(name=QUEUE_NAME, namespace=NAMESPACE, lifetime="detached",
                                               get_if_exists=True, num_cpus=0, max_restarts=-1,
                                               max_task_retries=-1).remote(_slots or 1)
        if _slots:
            ray.get(_handle.configure.remote(_slots))
    elif slots:
        ray.get(_handle.configure.remote(slots))
    return _handle


def ask(method: str, *args):
    """Call the queue (blocking: from a thread); a handle whose actor is gone for good is dropped and the call made
    once more on the one that `get_if_exists` then finds or makes."""
    global _handle
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(getattr(queue_actor(), method).remote(*args))
    except RayActorError:
        _handle = None
        return ray.get(getattr(queue_actor(), method).remote(*args))


def cancel_revoked(jobs_uri: str, owner: str, job_id: str) -> None:
    """Cancel a revoked key's job: its runner stops after its chunk, sending no webhook (the `revoked` marker)."""
    folder = store.job_folder(jobs_uri, owner, job_id)
    write_bytes(join(folder, store.REVOKED), b"")
    write_bytes(join(folder, "cancel"), b"")
    actor = runner(owner, job_id)
    if actor is not None:
        import ray

        ray.get(actor.cancel.remote())
        return
    ask("drop", job_id)  # waiting in line: its end is written here, and it sends no webhook
    state = store.read_state(folder) or {"id": job_id, "done": 0, "created_at": None}
    if state.get("state") not in store.ENDED:
        state.update(state="cancelled", finished_at=store.now_iso(), partial=False, result=None,
                     errors=[*state.get("errors", []), store.REVOKED_ERROR])
        write_json(join(folder, "state.json"), state)
    delete(store.active_marker(jobs_uri, owner, job_id))
