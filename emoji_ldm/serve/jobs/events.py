"""GET /v1/jobs/{id}/events: a durable job's story as server-sent events, derived from its state on shared storage.

A job's events and their ids are a function of its state.json alone, so any replica serves the same stream and a
reconnect resumes exactly after the `Last-Event-ID` it sends:

    id 0            queued     (position among the unfinished jobs, and an ETA once throughput is known)
    id 1            started
    id 1 + k        progress   done = k, one per finished emoji, k = 1 .. total
    id total + 2    completed | failed | cancelled   (the job's public status; the stream ends after it)

A job that ends before it starts skips `started` and the progress it never made; ids only grow. The stream
polls the state every POLL_S, sends a `: heartbeat` comment when it has said nothing for HEARTBEAT_S, and ends
after the terminal event or after MAX_STREAM_S (under Serve's request timeout); the client reconnects with the
last id (`retry:` says when)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

POLL_S = 1.0
HEARTBEAT_S = 15.0
MAX_STREAM_S = 300.0     # well under serve_config.yaml's request_timeout_s (600)
RETRY_MS = 2000
TERMINAL = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}
STARTED = 1


def last_event_id(header: str | None) -> int:
    """The id a reconnect resumes after (-1: from the start); a ValueError naming the header otherwise."""
    if header is None or not header.strip():
        return -1
    text = header.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise ValueError(f"Last-Event-ID {header[:40]!r} is not an event id of this stream: send the `id:` of the "
                         "last event received, or no Last-Event-ID to start from the beginning")
    return int(text)


def terminal_id(total: int | None) -> int:
    return (total or 0) + 2


def job_events(state: dict, after: int, queue: dict | None = None) -> list[tuple[int, str, dict]]:
    """(id, type, data) of every event of `state` (a job's state.json, `durable.public_state`'s input) with an id
    above `after`. `queue`: the queued event's {position, eta_s} (None: not measured)."""
    from emoji_ldm.serve.jobs.store import public_state

    total, done, now = state.get("total"), state.get("done", 0) or 0, state.get("state")
    out: list[tuple[int, str, dict]] = []
    if after < 0:
        out.append((0, "queued", {"state": "queued", "done": 0, "total": total, **(queue or {})}))
    if (now == "running" or state.get("started_at")) and after < STARTED:
        out.append((STARTED, "started", {"state": "running", "done": 0, "total": total,
                                         "started_at": state.get("started_at")}))
    for k in range(max(1, after - STARTED + 1), done + 1):
        out.append((STARTED + k, "progress", {"done": k, "total": total}))
    if now in TERMINAL and after < terminal_id(total):
        out.append((terminal_id(total), TERMINAL[now], public_state(state)))
    return out


def frame(event_id: int, kind: str, data: dict) -> bytes:
    """One SSE message: `data:` is one line of JSON (JSON never holds a raw newline)."""
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream(read_state: Callable[[], Awaitable[dict]], after: int,
                 queue: Callable[[], Awaitable[dict]]) -> AsyncIterator[bytes]:
    """The stream's bytes: `read_state()` each POLL_S (the job's state, from shared storage), the events above
    `after`; `queue()` measured only when the queued event is still to be sent."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    opened = said = time.monotonic()
    while time.monotonic() - opened < MAX_STREAM_S:
        state = await read_state()
        waiting = after < 0 and state.get("state") == "queued"
        for event_id, kind, data in job_events(state, after, await queue() if waiting else None):
            yield frame(event_id, kind, data)
            after, said = event_id, time.monotonic()
            if event_id == terminal_id(state.get("total")):
                return
        if state.get("state") in TERMINAL:  # resumed after the end: nothing more will come
            return
        if time.monotonic() - said >= HEARTBEAT_S:
            yield b": heartbeat\n\n"
            said = time.monotonic()
        await asyncio.sleep(POLL_S)
