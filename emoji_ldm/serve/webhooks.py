"""Job webhooks: where a callback may go (SSRF checks), how it is signed, and its delivery with retries.

A job may name a `callback_url`; when it ends (succeeded, failed or cancelled) its state is POSTed there
as JSON, signed with the calling key's webhook secret (`emoji-ldm keys create` prints it):

    X-Emoji-Ldm-Timestamp: 1795478400
    X-Emoji-Ldm-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

A receiver recomputes the HMAC over the raw body (`verify_signature`) and refuses a timestamp older than a
few minutes, so a captured delivery cannot be replayed later.

SSRF: the service runs beside the cluster's private network and a cloud's metadata endpoint, so a callback
may only go to a globally routable address (`ipaddress`'s `is_global`): loopback, private (10/8, 172.16/12,
192.168/16, fc00::/7), link-local (169.254/16, where the metadata endpoints live), carrier-grade NAT,
multicast and reserved ranges are refused, for an IP literal and for every address a hostname resolves to,
unless the operator's allowlist (`webhook_allow`, CIDRs) holds them. The name is resolved again right
before each delivery, and redirects are not followed, so DNS that changes after the check or a 30x to
an internal address gets nowhere.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Emoji-Ldm-Signature"
TIMESTAMP_HEADER = "X-Emoji-Ldm-Timestamp"
ATTEMPTS = 5             # one delivery and up to 4 retries
BACKOFF_S = 1.0          # 1, 2, 4, 8 s between them
TIMEOUT_S = 10.0


class CallbackRefused(ValueError):
    """A callback URL the service will not call; the message says why."""


def allowlist(cidrs: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
    except ValueError as e:
        raise ValueError(f"webhook_allow: {e}; give CIDRs or addresses such as 127.0.0.1 or 10.0.0.0/8") from None


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def check_callback(url: str, allow: Iterable[str] = (),
                   resolve: Callable[[str, int], list[str]] = _resolve) -> list[str]:
    """The addresses `url` reaches, when every one of them may be called; CallbackRefused otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused(f"callback_url {url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url must not carry credentials; the body is signed instead")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(parts.hostname, port)
    except (OSError, UnicodeError) as e:
        raise CallbackRefused(f"callback_url host {parts.hostname!r} does not resolve ({e})") from None
    if not addresses:
        raise CallbackRefused(f"callback_url host {parts.hostname!r} does not resolve")
    networks = allowlist(allow)
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if not ip.is_global and not any(ip in net for net in networks):
            what = "the host" if parts.hostname == text else f"{parts.hostname!r} resolves to"
            raise CallbackRefused(f"callback_url {url!r}: {what} {ip} is not a public address (loopback, "
                                  "private, link-local or metadata); the server's operator can allow it with "
                                  "webhook_allow")
    return addresses


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_signature(secret: str, body: bytes, timestamp: str, signature: str, tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """What a receiver runs: the signature matches the raw body and timestamp, and the timestamp is recent."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, ts), signature or "")


def deliver(url: str, payload: dict, secret: str, allow: Iterable[str] = (), attempts: int = ATTEMPTS,
            backoff_s: float = BACKOFF_S, sleep: Callable[[float], None] = time.sleep) -> dict:
    """POST the payload, signed, until a 2xx answer or `attempts` tries; returns what happened (no secret)."""
    import urllib3

    body = json.dumps(payload, sort_keys=True).encode()
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=TIMEOUT_S))
    outcome = {"url": url, "attempts": 0, "delivered": False, "status": None, "error": None}
    for attempt in range(attempts):
        if attempt:
            sleep(backoff_s * 2 ** (attempt - 1))
        outcome["attempts"] = attempt + 1
        try:
            check_callback(url, allow)  # again: the name may resolve elsewhere now
        except CallbackRefused as e:
            outcome["error"] = str(e)
            return outcome
        ts = int(time.time())
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(ts),
                   SIGNATURE_HEADER: sign(secret, body, ts), "User-Agent": "emoji-ldm-webhook"}
        try:
            response = http.request("POST", url, body=body, headers=headers, redirect=False)
        except urllib3.exceptions.HTTPError as e:
            outcome["error"] = f"{type(e).__name__}: {e}"
            continue
        outcome["status"] = response.status
        if 200 <= response.status < 300:
            outcome.update(delivered=True, error=None)
            return outcome
        outcome["error"] = f"HTTP {response.status}"
        if 400 <= response.status < 500 and response.status not in (408, 429):
            return outcome  # the receiver refuses this delivery: retrying will not change its mind
    logger.warning("webhook to %s not delivered after %d attempts: %s", url, attempts, outcome["error"])
    return outcome
