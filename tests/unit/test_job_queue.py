"""The durable jobs' fair queue (serve/jobs/queue.py), as plain Python: keys served round-robin within a priority,
a place in line that matches the order jobs really start in, an ETA from measured throughput, the closing lane for
cancelled and expired jobs, and the slot of a runner that vanished given back. The same queue on a real service:
tests/integration/test_service_shared.py."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from emoji_ldm.serve.jobs.queue import CHECK_RUNNERS_S, GRACE_S, FairLine, JobQueue, Waiting
from emoji_ldm.serve.jobs.store import JobSpec, read_request


def _waiting(owner: str, n: int, priority: int = 1, at: int = 0) -> Waiting:
    return Waiting(owner, f"{owner}-{n:03d}", priority, 1, f"2026-11-28T00:{at // 60:02d}:{at % 60:02d}Z", None)


def _served(line: FairLine) -> list[str]:
    """Every job in the order the queue starts them when it has a slot for each and none ends."""
    running, last, out = Counter(), {}, []
    while (entry := line.pop(running, last)) is not None:
        running[entry.owner] += 1
        last[entry.owner] = len(out)
        out.append(entry.job_id)
    return out


def test_a_key_with_one_job_waits_for_at_most_one_job_of_a_key_with_fifty():
    line = FairLine()
    for n in range(50):
        line.push(_waiting("heavy", n, at=n))
    line.push(_waiting("light", 0, at=59))  # it comes after all fifty
    order = _served(line)
    assert order[:3] == ["heavy-000", "light-000", "heavy-001"], order[:5]
    assert order[3:] == [f"heavy-{n:03d}" for n in range(2, 50)]


def test_a_higher_priority_goes_first_and_keys_share_each_level():
    line = FairLine()
    for n in range(3):
        line.push(_waiting("a", n, priority=2, at=n))       # low
        line.push(_waiting("b", n, priority=1, at=n))       # normal
    line.push(_waiting("c", 0, priority=0, at=30))          # high, last to come
    line.push(_waiting("d", 0, priority=1, at=31))
    order = _served(line)
    assert order == ["c-000", "b-000", "d-000", "b-001", "b-002", "a-000", "a-001", "a-002"]


def test_each_jobs_place_in_line_is_how_many_start_before_it():
    rng = random.Random(7)
    line = FairLine()
    for at in range(120):
        line.push(_waiting(rng.choice("abcde"), at, priority=rng.choice((0, 1, 1, 2)), at=at))
    for gone in rng.sample(sorted(line.where), 10):  # cancelled ones leave gaps
        line.remove(gone)
    places = [e.job_id for e in line.order(Counter(), {})]
    assert places == _served(line)


class _Runners:
    """Runners as the queue sees them: `started` in order, alive until `gone`."""

    def __init__(self):
        self.started, self.gone = [], set()

    def start(self, spec):
        self.started.append(spec.job_id)

    def alive(self, owner, job_id):
        return job_id not in self.gone


@pytest.fixture
def queue(tmp_path):
    runners, now = _Runners(), [1000.0]
    q = JobQueue(slots=1, start=runners.start, alive=runners.alive, clock=lambda: now[0], ticking=False)

    def submit(owner: str, n: int, images: int = 4, priority: str = "normal", deadline: float | None = None,
               callback: bool = False):
        body = {"prompts": ["a cat"], "per_prompt": images, "steps": 2,
                **({"callback_url": "https://hooks.example.com/x"} if callback else {})}
        spec = JobSpec(str(tmp_path / "jobs"), owner, f"job-{owner}-{n:04d}", body, f"hash-{owner}-{n}", "/m")
        return q.submit(spec, priority, deadline)

    q.runners, q.now, q.submit_job = runners, now, submit
    return q


def test_the_queue_makes_each_job_once_and_starts_it_when_a_slot_frees(queue, tmp_path):
    assert queue.submit_job("a", 1) == "hash-a-1"
    assert queue.submit_job("a", 1) == "hash-a-1"  # a duplicate: the same job, not a second one
    assert read_request(str(tmp_path / "jobs" / "a" / "job-a-0001"))["priority"] == "normal"
    queue.submit_job("a", 2)
    queue.submit_job("b", 1)
    assert queue.runners.started == ["job-a-0001"]
    assert queue.place("b", "job-b-0001") == {"state": "waiting", "position": 0, "priority": "normal", "eta_s": None}
    assert queue.place("a", "job-b-0001") is None  # another key's job is not in its line
    queue.now[0] += 8.0
    queue.release("job-a-0001", 4, 8.0)  # 0.5 images/s a slot
    assert queue.runners.started == ["job-a-0001", "job-b-0001"]
    # a-2 waits for b-1 (4 images, just started): 8 s at 0.5 images/s
    assert queue.place("a", "job-a-0002") == {"state": "waiting", "position": 0, "priority": "normal", "eta_s": 8.0}
    assert queue.unfinished("a") == {"job-a-0002"} and queue.unfinished("b") == {"job-b-0001"}


def test_a_cancelled_or_expired_job_that_waits_ends_at_once_without_a_slot(queue, tmp_path):
    from emoji_ldm.serve.jobs.store import read_state

    queue.submit_job("a", 1)
    queue.submit_job("a", 2, callback=True)
    queue.submit_job("a", 3, deadline=time.time() - 1)
    queue.submit_job("a", 4)
    assert queue.cancel("job-a-0002") is True  # its webhook waits for its end: its runner sends it, in no slot
    assert queue.runners.started == ["job-a-0001", "job-a-0002"]
    assert queue.snapshot()["closing"] == ["job-a-0002"] and queue.snapshot()["running"] == ["job-a-0001"]
    queue.tick()  # a-3 is past its Cancel-After deadline: ended here, no runner
    assert queue.cancel("job-a-0004") is True
    assert queue.runners.started == ["job-a-0001", "job-a-0002"] and queue.snapshot()["waiting"] == 0
    expired, cancelled = (read_state(str(tmp_path / "jobs" / "a" / f"job-a-000{n}")) for n in (3, 4))
    assert expired["state"] == "cancelled" and "Cancel-After deadline" in expired["errors"][0], expired
    assert cancelled["state"] == "cancelled" and cancelled["errors"] == [] and cancelled["total"] == 4
    unfinished = sorted(p.name for p in (tmp_path / "jobs" / "_active" / "a").iterdir())
    assert unfinished == ["job-a-0001", "job-a-0002"]
    assert queue.cancel("job-a-0001") is False  # running: its runner stops it, not the queue


def test_a_keys_jobs_made_in_the_same_second_start_in_the_order_they_came(queue, monkeypatch):
    """created_at has whole seconds: within one, a key's jobs go in the order they came, not by their random ids."""
    from emoji_ldm.serve.jobs import store

    monkeypatch.setattr(store, "now_iso", lambda: "2026-11-28T00:00:00Z")
    for n in (9, 3, 7, 1):  # ids that sort in another order than they came
        queue.submit_job("a", n)
    assert [queue.place("a", f"job-a-{n:04d}")["position"] for n in (3, 7, 1)] == [0, 1, 2]
    for n in (9, 3, 7):
        queue.release(f"job-a-{n:04d}", 4, 1.0)
    assert queue.runners.started == ["job-a-0009", "job-a-0003", "job-a-0007", "job-a-0001"]


def test_a_runner_that_vanished_gives_its_slot_back(queue):
    queue.submit_job("a", 1)
    queue.submit_job("b", 1)
    queue.runners.gone.add("job-a-0001")
    queue.now[0] += CHECK_RUNNERS_S + GRACE_S
    queue.tick()
    assert queue.runners.started == ["job-a-0001", "job-b-0001"]


def test_a_high_priority_job_from_another_key_goes_before_the_waiting_normal_ones(queue):
    for n in range(3):
        queue.submit_job("a", n)
    queue.submit_job("b", 0, priority="high")
    assert queue.place("b", "job-b-0000")["position"] == 0
    queue.release("job-a-0000", 4, 1.0)
    assert queue.runners.started == ["job-a-0000", "job-b-0000"]


def test_concurrent_duplicates_make_one_job(queue):
    threads = [threading.Thread(target=queue.submit_job, args=("a", 1)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert queue.runners.started == ["job-a-0001"] and queue.snapshot()["waiting"] == 0


@pytest.mark.parametrize("header, seconds", [("90s", 90), ("5m", 300), ("1h30m", 5400), ("45", 45), ("1.5m", 90)])
def test_cancel_after_reads_durations(header, seconds):
    from emoji_ldm.serve.limits import cancel_after

    assert abs(cancel_after(header) - time.time() - seconds) < 2


@pytest.mark.parametrize("header", ["0", "250ms", "soon", "5m3", "31d", "-5s", "1e9"])
def test_a_bad_cancel_after_is_a_400_naming_it(header):
    from emoji_ldm.serve.errors import ApiError
    from emoji_ldm.serve.limits import cancel_after

    with pytest.raises(ApiError) as e:
        cancel_after(header)
    assert e.value.status == 400 and e.value.field == "Cancel-After" and repr(header) in e.value.message


def test_a_key_may_not_ask_above_its_max_priority():
    from types import SimpleNamespace

    from emoji_ldm.serve.errors import ApiError
    from emoji_ldm.serve.limits import check_priority

    check_priority("high", None)  # a server without keys
    check_priority("low", SimpleNamespace(max_priority="normal"))
    with pytest.raises(ApiError) as e:
        check_priority("high", SimpleNamespace(max_priority="normal"))
    assert e.value.status == 403 and "priority 'high' is above this key's max_priority 'normal'" in e.value.message


def test_a_runner_past_its_deadline_cancels_its_job():
    from emoji_ldm.serve.jobs.runner import JobRunner

    runner = object.__new__(JobRunner)
    runner._cancel, runner.deadline = threading.Event(), time.time() - 1
    runner.cancel = runner._cancel.set
    assert runner._past_deadline() and runner._cancel.is_set() and runner.expired
