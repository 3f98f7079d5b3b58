"""A durable job's webhooks: the events its `callback_events` asks for (left out: completed, failed and cancelled,
the one delivery jobs always had), each POSTed by `webhooks.deliver` with our headers and the Standard Webhooks
ones. Events before the end (queued, started, progress: once per chunk drawn) go out in order on one background
thread, so a slow receiver never slows the drawing; the end is delivered after them, by the runner itself, and
its outcome is the job's `callback` record."""

from __future__ import annotations

import json
import queue
import threading

DEFAULT_EVENTS = ("completed", "failed", "cancelled")
ENDS = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}
_DONE = None  # the background thread's last item


class JobHooks:
    """The webhooks of one job's runner, given its request body, its key's webhook secrets (or what gives them at
    delivery time, so a rotation since the job was made is honoured) and the allowlist."""

    def __init__(self, body: dict, secret, allow: tuple = ()):
        self.url, self.secret, self.allow = body.get("callback_url"), secret, tuple(allow)
        self.wanted = frozenset(body.get("callback_events") or DEFAULT_EVENTS)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def event(self, kind: str, state: dict, describe) -> None:
        """`kind` (queued, started, progress) with the job's status as of `state` (`describe`:
        `durable.public_state`), sent in the background when the job asks for it."""
        if not self.url or kind not in self.wanted:
            return
        status = json.loads(json.dumps(describe(state)))  # as of now: the runner goes on changing `state`
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_all, name="job-webhooks", daemon=True)
            self._thread.start()
        done = (status.get("progress") or {}).get("done", 0)
        self._queue.put((kind, f"{status['id']}_{kind}" + (f"-{done}" if kind == "progress" else ""), status))

    def final(self, status: dict) -> dict | None:
        """The delivery of the job's end (`status["state"]`: succeeded, failed or cancelled) after the events
        before it, as `webhooks.deliver` reports it; None when the job's events leave the end out."""
        from emoji_ldm.serve.webhooks import deliver

        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()
        kind = ENDS[status["state"]]
        if not self.url or kind not in self.wanted:
            return None
        return deliver(self.url, status, self._secrets(), self.allow, event=kind)

    def _secrets(self) -> tuple[str, ...]:
        secret = self.secret() if callable(self.secret) else self.secret
        return (secret,) if isinstance(secret, str) else tuple(secret)

    def _send_all(self) -> None:
        from emoji_ldm.serve.webhooks import deliver

        while (item := self._queue.get()) is not _DONE:
            kind, message, payload = item
            deliver(self.url, payload, self._secrets(), self.allow, event=kind, message_id=message)
