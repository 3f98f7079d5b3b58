"""A job's server-sent events (serve/jobs/events.py) as a function of its durable state: ids that only grow, one
progress event per finished emoji, and a resume after any id that gives exactly the rest, read back with the
client's own SSE parser."""

from __future__ import annotations

import asyncio

import pytest

from emoji_ldm.client.events import SseParser, event_from_sse
from emoji_ldm.serve.jobs import events


def _state(state: str, done: int = 0, total: int = 5, started: bool = False) -> dict:
    return {"id": "job-1", "kind": "set", "state": state, "done": done, "total": total, "errors": [],
            "created_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:01Z" if started else None,
            "finished_at": None, "partial": False, "result": None, "callback": None}


# a job's states as its runner writes them, chunks of two images
STORY = [_state("queued"), _state("running", 0, started=True), _state("running", 2, started=True),
         _state("running", 4, started=True), _state("succeeded", 5, started=True)]


def _run(states: list[dict], after: int) -> list[tuple[int, str, dict]]:
    """The stream's events over `states` (one poll each), parsed as the client parses them."""
    polls = iter(states)

    async def read():
        return next(polls)

    async def queue():
        return {"position": 3, "eta_s": None}

    async def collect():
        return b"".join([chunk async for chunk in events.stream(read, after, queue)])

    parser = SseParser()
    messages = parser.feed(asyncio.run(collect()))
    assert parser.retry_s == events.RETRY_MS / 1000
    return [(int(m.id), m.event, event_from_sse("job-1", m)) for m in messages]


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    monkeypatch.setattr(events, "POLL_S", 0)
    monkeypatch.setattr(events, "MAX_STREAM_S", 5)


def test_the_whole_story_one_progress_per_emoji():
    got = _run(STORY, -1)
    assert [(i, kind) for i, kind, _ in got] == [(0, "queued"), (1, "started"), (2, "progress"), (3, "progress"),
                                                 (4, "progress"), (5, "progress"), (6, "progress"), (7, "completed")]
    assert [e.done for _, kind, e in got if kind == "progress"] == [1, 2, 3, 4, 5]
    assert got[0][2].data["position"] == 3 and got[0][2].total == 5
    assert got[-1][2].data["state"] == "succeeded" and got[-1][2].done == 5


@pytest.mark.parametrize("cut", range(0, 8))
def test_a_resume_after_any_id_gives_exactly_the_rest(cut):
    """The first connection is cut after event `cut`; the job moves on; the reconnect sends that id."""
    first = [e for e in _run(STORY, -1) if e[0] <= cut]
    rest = _run(STORY[2:], cut) if cut < 7 else []
    ids = [i for i, _, _ in first + rest]
    assert ids == list(range(8))


def test_a_job_that_ends_before_it_starts():
    got = _run([_state("queued"), _state("cancelled")], -1)
    assert [(i, kind) for i, kind, _ in got] == [(0, "queued"), (7, "cancelled")]
    failed = _run([_state("failed", 3, started=True)], 1)  # resumed after `started`
    assert [(i, kind) for i, kind, _ in failed] == [(2, "progress"), (3, "progress"), (4, "progress"),
                                                    (7, "failed")]


def test_a_quiet_job_gets_heartbeats_and_the_stream_ends(monkeypatch):
    monkeypatch.setattr(events, "HEARTBEAT_S", 0)
    monkeypatch.setattr(events, "MAX_STREAM_S", 0.2)

    async def read():
        return _state("queued")

    async def queue():
        return {}

    async def collect():
        return b"".join([chunk async for chunk in events.stream(read, 0, queue)])

    data = asyncio.run(collect())
    assert b": heartbeat\n\n" in data and b"event:" not in data  # queued (id 0) was already seen


@pytest.mark.parametrize("header,after", [(None, -1), ("", -1), ("0", 0), (" 12 ", 12)])
def test_last_event_id(header, after):
    assert events.last_event_id(header) == after


@pytest.mark.parametrize("header", ["-1", "progress-3", "1e3", "٣", "9" * 13])
def test_a_foreign_last_event_id_is_refused(header):
    with pytest.raises(ValueError, match="Last-Event-ID"):
        events.last_event_id(header)


def test_a_resume_after_the_end_ends_at_once():
    assert _run([_state("succeeded", 5, started=True)], 7) == []
