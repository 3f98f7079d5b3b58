"""Reading an item's bytes: a file, HTTP with retries, or drawn (synthetic, a font's glyph, an SVG).

The item types (`ITEM_SCHEMA`, `SourceItem`, `FetchError`, `items_dataset`) live in `items.py`, below the
sources that draw their pictures, and are named here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.sources.items import ITEM_SCHEMA, FetchError, SourceItem, items_dataset

__all__ = ["ITEM_SCHEMA", "FetchConfig", "FetchError", "SourceItem", "fetch_bytes", "fetch_url", "items_dataset",
           "make_pool", "read_file"]

USER_AGENT = "emoji-ldm/0.1 (+https://github.com/emoji-ldm/emoji-ldm; dataset builder)"


@dataclass(frozen=True)
class FetchConfig:
    """How URL items are downloaded inside the Ray Data tasks."""

    timeout_s: float = opt(10.0, flag="timeout", help="urls: seconds per download attempt (connect + read)")
    retries: int = opt(3, help="urls: extra attempts after timeouts, connection errors, 429 and 5xx")
    backoff_s: float = opt(0.5, cli=False, help="first back-off; doubles each retry, with jitter")
    # more threads only add GIL contention per core
    threads: int = opt(4, help="urls: concurrent downloads per Ray task")
    per_host: int = opt(4, help="urls: concurrent connections per host per Ray task")
    max_bytes: int = opt(20 * 1024 * 1024, cli=False, help="stop reading and reject past this size")

    def __post_init__(self):
        for name in ("timeout_s", "threads", "per_host", "max_bytes"):
            if getattr(self, name) <= 0:
                raise UserError(f"fetch setting {name} must be positive, got {getattr(self, name)!r}")
        if self.retries < 0 or self.backoff_s < 0:
            raise UserError(f"retries and backoff_s must be >= 0, got {self.retries}, {self.backoff_s}")


_RETRY_STATUS = (429, 500, 502, 503, 504)


def make_pool(config: FetchConfig):
    """A urllib3 pool: at most `per_host` connections per host (callers block for one),
    retries with exponential back-off on connection errors, timeouts, 429 and 5xx."""
    import urllib3

    retry = urllib3.Retry(
        total=config.retries,
        backoff_factor=config.backoff_s,
        backoff_jitter=config.backoff_s / 2,
        status_forcelist=_RETRY_STATUS,
        raise_on_status=False,  # the last 5xx comes back as a response we can name
        respect_retry_after_header=True,
    )
    return urllib3.PoolManager(
        num_pools=64, maxsize=config.per_host, block=True, retries=retry,
        timeout=urllib3.Timeout(total=config.timeout_s), headers={"User-Agent": USER_AGENT},
    )


def fetch_url(pool, url: str, config: FetchConfig) -> bytes:
    """GET `url` through `pool`; FetchError(reason, detail) on any failure."""
    import urllib3

    try:
        r = pool.request("GET", url, preload_content=False)
    except urllib3.exceptions.MaxRetryError as e:
        cause = type(e.reason).__name__ if e.reason else "error"
        raise FetchError("fetch_failed", f"{cause} after {config.retries + 1} attempts") from None
    except urllib3.exceptions.HTTPError as e:
        raise FetchError("fetch_failed", f"{type(e).__name__}: {e}"[:200]) from None
    try:
        if r.status >= 400:
            raise FetchError("http_error", f"HTTP {r.status}")
        chunks, size = [], 0
        for chunk in r.stream(64 * 1024):
            size += len(chunk)
            if size > config.max_bytes:
                raise FetchError("too_large_bytes", f"more than max_bytes {config.max_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)
    except urllib3.exceptions.HTTPError as e:  # timeouts or resets while reading the body
        raise FetchError("fetch_failed", f"{type(e).__name__} while reading the body") from None
    finally:
        r.release_conn()


def read_file(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise FetchError("fetch_failed", f"cannot read file: {e.strerror}") from None
    if len(data) > max_bytes:
        raise FetchError("too_large_bytes", f"more than max_bytes {max_bytes}")
    return data


def fetch_bytes(locator: str, config: FetchConfig, pool=None) -> bytes:
    if locator.startswith(("http://", "https://")):
        return fetch_url(pool if pool is not None else make_pool(config), locator, config)
    if locator.startswith("synthetic:"):
        from emoji_ldm.sources.synthetic import draw

        return draw(locator)
    if locator.startswith("noto:"):
        from emoji_ldm.sources.noto import render

        return render(locator)
    if locator.startswith("openmoji:"):
        from emoji_ldm.sources.openmoji import rasterise

        return rasterise(locator)
    if not locator.startswith("/"):
        raise FetchError("bad_url", f"{locator[:200]!r} is not an http(s) URL or an absolute path")
    return read_file(locator, config.max_bytes)
