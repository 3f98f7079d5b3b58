"""HTTP for the client: urllib3 (already a dependency), the key, and the retry rules.

Retried: a connection that failed or dropped, a 429 (after its `Retry-After`) and a 503; never another 4xx,
and never a 500 (a bug answers the same the second time). A request that is not idempotent (`/v1/generate`)
is retried only when the service cannot have seen it (the connection was never made) or refused it before
any work (429, 503). A job's POST is idempotent by construction: the client sends the same Idempotency-Key
on every try, so the service makes one job however many tries reach it."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError

from emoji_ldm.client.errors import ConnectError, error_for, retry_after_s
from emoji_ldm.errors import UserError
from emoji_ldm.version import __version__

RETRIED_STATUSES = (429, 503)
KEY_VARIABLE = "EMOJI_LDM_API_KEY"


class Retry(NamedTuple):
    """What `on_retry` is told before the client waits: try number (1: the first retry), seconds it will
    wait, and why (an HTTP status, or the connection error's name)."""

    attempt: int
    wait_s: float
    status: int | None
    reason: str


@dataclass(frozen=True)
class Settings:
    """A client's settings. `timeout`: seconds to connect and between bytes of an answer; `retries`: tries
    after the first; `backoff_s`: the first wait, doubled each retry up to `max_backoff_s`; `max_retry_after_s`:
    a 429's `Retry-After` longer than this raises `RateLimitError` at once instead of sleeping; `poll_s` and
    `max_poll_s`: a job's status is polled every poll_s, stretched up to max_poll_s while nothing changes;
    `sse`: try `GET /v1/jobs/{id}/events` before polling."""

    base_url: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0
    poll_s: float = 1.0  # a key's default rate is 60 requests a minute
    max_poll_s: float = 5.0
    sse: bool = True

    def __post_init__(self):
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"base_url {self.base_url!r} is not an http(s) URL: give the service's address, e.g. "
                            "'http://127.0.0.1:8000'")
        for name in ("timeout", "backoff_s", "max_backoff_s", "max_retry_after_s", "poll_s", "max_poll_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{name} {value!r} must be a number of seconds above 0")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise UserError(f"retries {self.retries!r} must be an integer of 0 or more (0: no retries)")
        if self.api_key is not None and (not self.api_key.isascii() or not self.api_key.isprintable()):
            raise UserError("api_key holds a character an HTTP header cannot carry: paste the key `emoji-ldm keys "
                            "create` printed, nothing around it")


class Transport:
    """One connection pool and the retry loop; `sleep` and `on_retry` are what the loop waits with and tells."""

    def __init__(self, settings: Settings, on_retry: Callable[[Retry], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.settings, self.on_retry, self.sleep = settings, on_retry, sleep
        self.base = settings.base_url.rstrip("/")
        self.pool = urllib3.PoolManager(retries=False, timeout=self.timeout(settings.timeout))
        self.headers = {"User-Agent": f"emoji-ldm-client/{__version__}"}
        key = settings.api_key if settings.api_key is not None else os.environ.get(KEY_VARIABLE)
        if key:
            self.headers["Authorization"] = f"Bearer {key.strip()}"

    def timeout(self, read: float) -> urllib3.Timeout:
        return urllib3.Timeout(connect=min(self.settings.timeout, 30.0), read=read)

    def backoff(self, attempt: int) -> float:
        """Exponential with jitter (half to all of it), so clients refused together do not return together."""
        top = min(self.settings.max_backoff_s, self.settings.backoff_s * 2 ** (attempt - 1))
        return top * (0.5 + random.random() / 2)

    def request(self, method: str, path: str, *, body=None, headers: dict | None = None, idempotent: bool = True,
                stream: bool = False, read_timeout: float | None = None) -> urllib3.BaseHTTPResponse:
        """The answer (status below 400), after the retries; the `EmojiLdmError` for its status otherwise.
        `body`: a dict (sent as JSON) or bytes; `stream`: the answer's body is left unread (release it)."""
        data, sent = body, {**self.headers, **(headers or {})}
        if isinstance(body, dict):
            data, sent = json.dumps(body).encode(), {"Content-Type": "application/json", **sent}
        url, attempt = self.base + path, 0
        while True:
            try:
                answer = self.pool.request(method, url, body=data, headers=sent, preload_content=not stream,
                                           timeout=self.timeout(read_timeout or self.settings.timeout))
            except HTTPError as e:
                unsent = isinstance(e, (NewConnectionError, ConnectTimeoutError)) or isinstance(
                    getattr(e, "reason", None), (NewConnectionError, ConnectTimeoutError))
                if attempt >= self.settings.retries or not (idempotent or unsent):
                    raise ConnectError(f"{method} {url}: {_reason(e)}") from e
                attempt += 1
                self.wait(Retry(attempt, self.backoff(attempt), None, type(e).__name__))
                continue
            if answer.status < 400:
                return answer
            error = error_for(answer.status, answer.read() if stream else answer.data, answer.headers)
            answer.release_conn()
            if answer.status not in RETRIED_STATUSES or attempt >= self.settings.retries:
                raise error
            wait = retry_after_s(answer.headers.get("Retry-After"))
            if wait is not None and wait > self.settings.max_retry_after_s:
                raise error  # longer than this client waits: the caller decides
            attempt += 1
            self.wait(Retry(attempt, self.backoff(attempt) if wait is None else wait, answer.status,
                             error.message))

    def json(self, method: str, path: str, **kwargs) -> dict:
        return json.loads(self.request(method, path, **kwargs).data or b"{}")

    def wait(self, retry: Retry) -> None:
        if self.on_retry is not None:
            self.on_retry(retry)
        self.sleep(retry.wait_s)


def _reason(e: HTTPError) -> str:
    inner = getattr(e, "reason", None)
    return str(inner or e) or type(e).__name__


def close_stream(answer: urllib3.BaseHTTPResponse) -> None:
    """Give back a streamed answer's connection: closed if its body was not read to the end, so that the pool
    never hands out a connection with half a stream still in it."""
    try:
        if not answer.isclosed():
            answer.close()
    finally:
        answer.release_conn()
