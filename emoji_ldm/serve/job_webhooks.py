"""A durable job's webhooks: the events its `callback_events` asks for (left out: completed, failed and cancelled,
the one delivery jobs always had), each POSTed by `webhooks.deliver` with our headers and the Standard Webhooks
ones. Events before the end (queued, started, progress: once per chunk drawn) go out in order on one background
thread, so a slow receiver never slows the drawing; the end is delivered after them, by the runner itself, and
its outcome is the job's `callback` record."""

from __future__ import annotations

import queue
import threading

DEFAULT_EVENTS = ("completed", "failed", "cancelled")
ENDS = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}
_DONE = None  # the background thread's last item


class JobHooks:
    """The webhooks of one job's runner, given its request body, its key's webhook secret and the allowlist."""

    def __init__(self, body: dict, secret: str, allow: tuple = ()):
        self.url, self.secret, self.allow = body.get("callback_url"), secret, tuple(allow)
        self.wanted = frozenset(body.get("callback_events") or DEFAULT_EVENTS)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def event(self, kind: str, state: dict) -> None:
        """`kind` (queued, started, progress) as of `state`, sent in the background when the job asks for it."""
        from emoji_ldm.serve.durable import public_state

        if not self.url or kind not in self.wanted:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_all, name="job-webhooks", daemon=True)
            self._thread.start()
        message = f"{state['id']}_{kind}" + (f"-{state.get('done', 0)}" if kind == "progress" else "")
        self._queue.put((kind, message, public_state(state)))  # a copy: the runner goes on changing `state`

    def final(self, state: dict) -> dict | None:
        """The delivery of the job's end (its state: succeeded, failed or cancelled) after the events before it,
        as `webhooks.deliver` reports it; None when the job's events leave the end out."""
        from emoji_ldm.serve.durable import public_state
        from emoji_ldm.serve.webhooks import deliver

        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()
        kind = ENDS[state["state"]]
        if not self.url or kind not in self.wanted:
            return None
        return deliver(self.url, public_state(state), self.secret, self.allow, event=kind)

    def _send_all(self) -> None:
        from emoji_ldm.serve.webhooks import deliver

        while (item := self._queue.get()) is not _DONE:
            kind, message, payload = item
            deliver(self.url, payload, self.secret, self.allow, event=kind, message_id=message)
