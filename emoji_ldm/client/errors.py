"""The client's errors: one `EmojiLdmError` family carrying the HTTP status and the service's own JSON message.

The service answers every error as `{"error": message, "field": name or null, ...figures}` (serve/http.py); the
client raises the subclass for its status with that message, so `except RateLimitError as e: e.retry_after`
and `except ValidationError as e: e.field` read what the service said, not a generic HTTP line."""

from __future__ import annotations

import email.utils
import json
import time


class EmojiLdmError(Exception):
    """An error of the service or of reaching it. `status`: the HTTP status (None: no answer came); `message`:
    the service's `error`; `field`: the request field it names, if any; `body`: the whole JSON answer."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None, body: dict | None = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.message, self.status, self.field, self.body = message, status, field, body or {}


class ConnectError(EmojiLdmError):
    """No answer: the connection failed, was refused or dropped, after every retry."""


class BadRequestError(EmojiLdmError):
    """400: the request itself is malformed (not retried)."""


class AuthenticationError(EmojiLdmError):
    """401 or 403: no key, a wrong or revoked key, or a keyless server that answers only localhost."""


class NotFoundError(EmojiLdmError):
    """404: no such job for this key, or the service has no such route."""


class ConflictError(EmojiLdmError):
    """409: an Idempotency-Key reused with another body, a result asked for before it exists, a feature the
    operator did not turn on."""


class ValidationError(EmojiLdmError):
    """413 or 422: a field out of its limits; `field` names it."""


class RateLimitError(EmojiLdmError):
    """429 after every retry: the key's rate, cost budget or job quota; `retry_after` in seconds, if given."""

    def __init__(self, *args, retry_after: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class ServerError(EmojiLdmError):
    """5xx: the service failed (503: at capacity or a replica restarting, retried first)."""


class JobFailed(EmojiLdmError):
    """The job ended `failed`; `job` is its last status, `errors` what the service recorded."""

    def __init__(self, message: str, job: dict):
        super().__init__(message, body=job)
        self.job, self.errors = job, list(job.get("errors") or [])


class JobCancelled(JobFailed):
    """The job ended `cancelled`; what it drew before is still its (partial) result."""


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
              409: ConflictError, 413: ValidationError, 422: ValidationError, 429: RateLimitError}


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for: delta-seconds or an HTTP date (RFC 9110); None if absent or
    unreadable, never negative."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_for(status: int, data: bytes, headers=None) -> EmojiLdmError:
    """The exception for an error answer: the service's JSON message, or the start of a body that is not ours
    (a proxy's HTML page)."""
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = data[:200].decode("utf-8", "replace").strip() if data else ""
        body = {"error": text or f"HTTP {status} with no body"}
    message = str(body.get("error") or body.get("detail") or f"HTTP {status}")
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else EmojiLdmError)
    if cls is RateLimitError:
        wait = retry_after_s((headers or {}).get("Retry-After"))
        return RateLimitError(message, status, body.get("field"), body, retry_after=wait)
    return cls(message, status, body.get("field"), body)
