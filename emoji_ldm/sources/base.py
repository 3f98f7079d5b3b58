"""The item a source lists, and reading its bytes (file or HTTP with retries)."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import requests

from emoji_ldm.errors import UserError

USER_AGENT = "emoji-ldm/0.1 (+https://github.com/emoji-ldm/emoji-ldm; dataset builder)"


@dataclass(frozen=True)
class SourceItem:
    locator: str  # a local path or an http(s) URL
    source: str  # the spec that listed it, e.g. "twemoji" or "dir:/data/pack"
    title: str = ""
    tag: str = ""
    caption: str | None = None  # a caption the source already has (metadata.csv `prompt`)
    source_url: str | None = None  # where the picture came from, when not the locator

    def to_row(self, key: int) -> dict:
        row = asdict(self)
        row["key"] = key
        row["source_url"] = self.source_url or self.locator
        return row


@dataclass(frozen=True)
class FetchConfig:
    """How URL items are downloaded inside the Ray Data tasks."""

    timeout_s: float = 10.0  # connect + read timeout of one attempt
    retries: int = 3  # extra attempts after timeouts, connection errors, 429 and 5xx
    backoff_s: float = 0.5  # first back-off; doubles each retry, with jitter
    threads: int = 16  # concurrent downloads per Ray task
    per_host: int = 8  # concurrent downloads per host per Ray task
    max_bytes: int = 20 * 1024 * 1024  # stop reading and reject past this size

    def __post_init__(self):
        for name in ("timeout_s", "threads", "per_host", "max_bytes"):
            if getattr(self, name) <= 0:
                raise UserError(f"fetch setting {name} must be positive, got {getattr(self, name)!r}")
        if self.retries < 0 or self.backoff_s < 0:
            raise UserError(f"retries and backoff_s must be >= 0, got {self.retries}, {self.backoff_s}")


class FetchError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class HostLimiter:
    """At most `per_host` requests in flight to one host (within one task)."""

    def __init__(self, per_host: int):
        self._per_host = per_host
        self._lock = threading.Lock()
        self._sems: dict[str, threading.Semaphore] = {}

    def __call__(self, url: str) -> threading.Semaphore:
        host = urlsplit(url).netloc
        with self._lock:
            if host not in self._sems:
                self._sems[host] = threading.Semaphore(self._per_host)
            return self._sems[host]


def _download(session: requests.Session, url: str, config: FetchConfig) -> bytes:
    with session.get(url, timeout=config.timeout_s, stream=True, headers={"User-Agent": USER_AGENT}) as r:
        if r.status_code >= 400:
            raise FetchError("http_error", f"HTTP {r.status_code}")
        chunks, size = [], 0
        for chunk in r.iter_content(64 * 1024):
            size += len(chunk)
            if size > config.max_bytes:
                raise FetchError("too_large_bytes", f"more than max_bytes {config.max_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)


def fetch_url(session: requests.Session, url: str, config: FetchConfig, limiter: HostLimiter) -> bytes:
    """GET with timeouts, retries with exponential back-off on transient failures."""
    delay = config.backoff_s
    for attempt in range(config.retries + 1):
        last = attempt == config.retries
        try:
            with limiter(url):
                return _download(session, url, config)
        except FetchError as e:
            transient = e.reason == "http_error" and (e.detail in ("HTTP 429",) or e.detail.startswith("HTTP 5"))
            if not transient or last:
                raise
        except (requests.Timeout, requests.ConnectionError) as e:
            if last:
                raise FetchError("fetch_failed", f"{type(e).__name__} after {attempt + 1} attempts") from None
        except requests.RequestException as e:
            raise FetchError("fetch_failed", f"{type(e).__name__}: {e}"[:200]) from None
        time.sleep(delay * (0.5 + random.random()))
        delay *= 2
    raise AssertionError("unreachable")


def read_file(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise FetchError("fetch_failed", f"cannot read file: {e.strerror}") from None
    if len(data) > max_bytes:
        raise FetchError("too_large_bytes", f"more than max_bytes {max_bytes}")
    return data


def fetch_bytes(locator: str, config: FetchConfig, session=None, limiter=None) -> bytes:
    if locator.startswith(("http://", "https://")):
        return fetch_url(session or requests.Session(), locator, config, limiter or HostLimiter(config.per_host))
    return read_file(locator, config.max_bytes)
