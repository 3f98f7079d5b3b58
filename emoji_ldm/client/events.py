"""A job's events, from either source: a `text/event-stream` (`SseParser`, the WHATWG rules: `id:`, `event:`,
`data:`, `retry:`, comments, CR/LF/CRLF lines split anywhere across reads) or successive polled statuses
(`Seen.from_status`: one `progress` event per finished emoji, however many finished between two polls).

Both feed the same `Event`, and `Seen` remembers what a subscriber was given, so that polling after a dropped
stream repeats nothing the stream already said."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

TERMINAL = ("completed", "failed", "cancelled")
# a job's final state (GET /v1/jobs/{id}) -> the event that ends its stream
ENDED = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}


@dataclass(frozen=True)
class Event:
    """One thing that happened to a job. `type`: queued, started, progress, completed, failed, cancelled (a
    stream may add its own, e.g. a queue position; they pass through); `id`: the stream's event id, what a
    reconnect resumes after (polling makes stable ones: "queued", "progress-3", ...); `done`/`total`: emoji
    finished of how many, when known; `data`: the payload as the service sent it (a polled event: the status)."""

    type: str
    job_id: str
    id: str | None = None
    done: int | None = None
    total: int | None = None
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def terminal(self) -> bool:
        """The job has ended: no event follows this one."""
        return self.type in TERMINAL


class SseMessage(NamedTuple):
    id: str | None  # the last event id as of this message (the stream's, not only this message's)
    event: str
    data: str


class SseParser:
    """Incremental `text/event-stream` parser: `feed(bytes)` returns the messages completed by those bytes.
    `last_id` is the id a reconnect sends as `Last-Event-ID`: it changes only when a message is dispatched (a
    blank line), so a stream cut in the middle of a message resumes before that message, never after it."""

    def __init__(self):
        self._buffer = b""
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._id_buffer: str | None = None
        self.last_id: str | None = None
        self.retry_s: float | None = None  # the server's `retry:` (milliseconds on the wire)

    def feed(self, chunk: bytes) -> list[SseMessage]:
        self._buffer += chunk
        if not self._started and len(self._buffer) >= 3:
            self._started = True
            self._buffer = self._buffer.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM may open the stream
        out = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return out
            end, after = cut
            line = self._buffer[:end].decode("utf-8", "replace")
            self._buffer = self._buffer[after:]
            message = self._line(line)
            if message is not None:
                out.append(message)

    def _line(self, line: str) -> SseMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: servers send them to keep the connection alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_s = int(value) / 1000
        return None

    def _dispatch(self) -> SseMessage | None:
        self.last_id = self._id_buffer
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        if not data:
            return None
        return SseMessage(self.last_id, event, "\n".join(data))


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """(end of the first line, start of the next) in `buffer`, or None while the line is not complete. A CR
    at the very end waits for the next read: it may be the first half of a CRLF."""
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, lf + 1
    if cr + 1 == len(buffer):
        return None
    return cr, cr + 2 if buffer[cr + 1:cr + 2] == b"\n" else cr + 1


def event_from_sse(job_id: str, message: SseMessage) -> Event:
    """An `Event` of a stream message: its data as JSON (a status, or a small dict), done/total from its
    `progress` or top level."""
    try:
        data = json.loads(message.data)
    except ValueError:
        data = {"data": message.data}
    if not isinstance(data, dict):
        data = {"data": data}
    progress = data.get("progress") if isinstance(data.get("progress"), dict) else data
    return Event(message.event, job_id, message.id, _int(progress.get("done")), _int(progress.get("total")), data)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Seen:
    """What one subscriber has been given of a job, whichever source gave it."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.types: set[str] = set()
        self.done = 0

    def note(self, event: Event) -> Event:
        self.types.add(event.type)
        if event.type == "progress" and event.done is not None:
            self.done = max(self.done, event.done)
        return event

    def from_status(self, status: dict) -> list[Event]:
        """The events a polled status adds to what was seen: queued once, started once it runs, a progress
        event for each emoji finished since (done = 1, 2, ...), and the end. A job seen first when it has
        already ended still gets its whole story, so a subscriber's loop sees the same shape either way."""
        state = status.get("state")
        progress = status.get("progress") or {}
        done, total = _int(progress.get("done")) or 0, _int(progress.get("total"))
        out = []
        if not self.types & {"queued", "started", *TERMINAL}:
            out.append(Event("queued", self.job_id, "queued", 0, total, status))
        ran = state == "running" or (state in ENDED and status.get("started_at"))
        if ran and "started" not in self.types:
            out.append(Event("started", self.job_id, "started", self.done, total, status))
        for k in range(self.done + 1, done + 1):
            out.append(Event("progress", self.job_id, f"progress-{k}", k, total, status))
        if state in ENDED:
            out.append(Event(ENDED[state], self.job_id, ENDED[state], done, total, status))
        return [self.note(e) for e in out]
