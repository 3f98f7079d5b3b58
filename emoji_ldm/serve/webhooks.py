"""Job webhooks: where a callback may go (SSRF checks), how it is signed, and its delivery with retries.

A job may name a `callback_url`; when it ends (succeeded, failed or cancelled) its state is POSTed there
as JSON, signed with the calling key's webhook secret (`emoji-ldm keys create` prints it):

    X-Emoji-Ldm-Timestamp: 1795478400
    X-Emoji-Ldm-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>   (after `keys
                           rotate-webhook-secret`, one per live secret, comma separated, the new first)

A receiver recomputes the HMAC over the raw body (`verify_signature`) and refuses a timestamp older than a
few minutes, so a captured delivery cannot be replayed later. Beside ours, every delivery carries the Standard
Webhooks headers, so stock verifiers (`standardwebhooks.Webhook(secret).verify`) work:

    webhook-id: <job id>_<event>          the same on every retry of one delivery: a receiver dedupes by it
    webhook-timestamp: 1795478400
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<webhook-id>.<timestamp>." + body)>
    X-Emoji-Ldm-Event: completed          which event (a job's `callback_events` picks them)

The HMAC key is the secret's UTF-8 bytes for both; a Standard Webhooks receiver is given it as the spec
writes secrets, `whsec_` + base64 of those bytes (`standard_secret`).

SSRF: the service runs beside the cluster's private network and a cloud's metadata endpoint, so a callback
may only go to a public address. Three rules close the ways around that check:

- Parsed once, strictly, here (`parse_callback`), and never again by the HTTP client: plain ASCII only (no
  IDNA, whose 2003 and 2008 forms map `faß` to different names), no backslash, `%`, `@`, space or control
  character, a port from 1 to 65535, and a numeric host only as a canonical dotted quad (`2130706433`,
  `0177.0.0.1` and `127.1` are what a C resolver reads as 127.0.0.1; they are refused, not guessed at).
- Resolved once per delivery (`check_callback`), and every address must pass; the connection then goes to
  an address that was checked (pinned: the client connects to the IP, with the `Host` header and the TLS
  SNI and certificate check on the name), so DNS that answers otherwise a second later gets nowhere.
  Redirects are not followed.
- Classified by explicit refused ranges (`REFUSED`: RFC 6890's special-purpose registries, loopback,
  private, link-local with the metadata endpoints, carrier-grade NAT, NAT64 64:ff9b::/96 and
  64:ff9b:1::/48, 6to4, Teredo, IPv4-compatible, site-local, multicast, documentation, reserved), an
  IPv4-mapped address by the IPv4 inside, and anything else `ipaddress` does not call global; unless the
  operator's allowlist (`webhook_allow`, CIDRs) holds the address.

A caller learns only that its URL is not allowed (`REFUSED_MESSAGE`): what a name resolved to, and why that
was refused, goes to the server's log, so the check is no oracle for the cluster's DNS. Likewise a failed
delivery is recorded in the job's state as "delivery failed" and the receiver's HTTP status, never the
connection error (refused, reset, timed out: a port scanner's answers). A delivery reads at most
`MAX_RESPONSE_BYTES` of the answer and each attempt ends within `DEADLINE_S`, however slowly the receiver
answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Emoji-Ldm-Signature"
TIMESTAMP_HEADER = "X-Emoji-Ldm-Timestamp"
EVENT_HEADER = "X-Emoji-Ldm-Event"
ATTEMPTS = 5             # one delivery and up to 4 retries
BACKOFF_S = 1.0          # 1, 2, 4, 8 s between them
TIMEOUT_S = 10.0         # connecting, and each wait for bytes
DEADLINE_S = 20.0        # one attempt, from connecting to the last byte read, whatever the receiver does
MAX_RESPONSE_BYTES = 64 * 1024  # of the receiver's answer: read (so it can finish), then dropped

REFUSED_MESSAGE = "callback_url is not allowed: it must be a public http(s) URL"
DELIVERY_FAILED = "delivery failed"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# (range, why); IANA's IPv4 and IPv6 special-purpose registries (RFC 6890 and its updates) and the
# translation prefixes that reach an IPv4 address through an IPv6 one. An IPv4-mapped address
# (::ffff:0:0/96) is judged by the IPv4 address inside it.
REFUSED: tuple[tuple[Network, str], ...] = tuple((ipaddress.ip_network(net), why) for net, why in (
    ("0.0.0.0/8", "'this network' (RFC 791)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, where cloud metadata endpoints such as 169.254.169.254 live"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112 (RFC 7535)"),
    ("192.52.193.0/24", "AMT (RFC 7450)"),
    ("192.88.99.0/24", "6to4 relay anycast (RFC 3068)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("192.175.48.0/24", "AS112 direct delegation (RFC 7534)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (RFC 1112)"),
    ("255.255.255.255/32", "limited broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated, RFC 4291)"),
    ("::ffff:0:0:0/96", "IPv4-translated (RFC 2765)"),
    ("64:ff9b::/96", "NAT64 (RFC 6052): reaches the IPv4 address inside"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001::/32", "Teredo (RFC 4380): reaches the IPv4 address inside"),
    ("2001::/23", "IETF protocol assignments (RFC 2928)"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4 (RFC 3056): reaches the IPv4 address inside"),
    ("3fff::/20", "documentation (RFC 9637)"),
    ("5f00::/16", "SRv6 SIDs (RFC 9602)"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated, RFC 3879)"),
    ("ff00::/8", "multicast"),
))

_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<rest>[/?#].*)?", re.S)
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]*))?")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_NUMERIC_LABEL = re.compile(r"(?:0[xX][0-9A-Fa-f]*|[0-9]+)")  # what makes a WHATWG/inet_aton host an IPv4 one


class CallbackRefused(ValueError):
    """A callback URL the service will not call. `str()` is what the caller may be told; `detail` is for the
    server's log (it may name the internal address a host resolved to)."""

    def __init__(self, message: str = REFUSED_MESSAGE, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


@dataclasses.dataclass(frozen=True)
class Callback:
    """A parsed callback URL, and after `check_callback` the addresses it may be delivered to."""

    url: str
    scheme: str
    host: str                       # lowercase ASCII name, or an IP address (IPv6 without brackets)
    port: int
    target: str                     # the request target: path and query ("/" when empty)
    literal: bool                   # host is an IP address
    addresses: tuple[str, ...] = ()

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.scheme == "https" else 80) else f"{host}:{self.port}"


def allowlist(cidrs: Iterable[str]) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
    except ValueError as e:
        raise ValueError(f"webhook_allow: {e}; give CIDRs or addresses such as 127.0.0.1 or 10.0.0.0/8") from None


def _syntax(message: str) -> CallbackRefused:
    return CallbackRefused(f"callback_url is not allowed: {message}")


def parse_callback(url: str) -> Callback:
    """The URL's parts, parsed the one way this module will connect by; CallbackRefused (a ValueError, so
    pydantic makes it a 422) when it is not a plain http(s) URL. No DNS: `check_callback` resolves."""
    if not isinstance(url, str) or not url:
        raise _syntax("it must be a public http(s) URL")
    if not url.isascii() or any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise _syntax("it must be plain ASCII without spaces or control characters (percent-encode the path; "
                      "give an internationalised host name in its xn-- form)")
    if "\\" in url:
        raise _syntax("it must not contain a backslash")
    m = _URL.fullmatch(url)
    if m is None or m["scheme"].lower() not in ("http", "https"):
        raise _syntax("it must be an http:// or https:// URL with a host")
    scheme, authority, rest = m["scheme"].lower(), m["authority"], m["rest"] or ""
    if "@" in authority:
        raise _syntax("it must not carry credentials (user@host): the body is signed instead")
    if "%" in authority:
        raise _syntax("its host must not contain '%'")
    hp = _HOST_PORT.fullmatch(authority)
    if hp is None:
        raise _syntax("its host must be a DNS name, a dotted-quad IPv4 address or a bracketed IPv6 address, "
                      "with an optional :port")
    port = 443 if scheme == "https" else 80
    if hp["port"]:
        if len(hp["port"]) > 5 or not 1 <= int(hp["port"]) <= 65535:
            raise _syntax("its port must be a number from 1 to 65535")
        port = int(hp["port"])
    host = hp["host"].lower()
    target = rest.split("#", 1)[0] or "/"
    if target.startswith("?"):
        target = "/" + target
    if host.startswith("["):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _syntax("its bracketed host is not an IPv6 address") from None
        return Callback(url, scheme, str(ip), port, target, literal=True)
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # a client (and getaddrinfo's inet_aton) reads such a host as an IPv4 address, in decimal, octal,
        # hex or a short form; only the canonical dotted quad means one thing to everyone
        if not _DOTTED_QUAD.fullmatch(name):
            raise _syntax("a numeric host must be a dotted-quad IPv4 address such as 203.0.113.7 (no decimal, "
                          "octal, hex or short forms)")
        return Callback(url, scheme, str(ipaddress.IPv4Address(name)), port, target, literal=True)
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _syntax("its host is not a valid DNS name (letters, digits and '-' in dot-separated labels)")
    return Callback(url, scheme, name, port, target, literal=False)


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def refused_because(ip: Address, networks: Iterable[Network] = ()) -> str | None:
    """Why a callback may not go to `ip`, or None when it may (a public address, or one the allowlist holds)."""
    networks = tuple(networks)
    embedded = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if any(ip in net or (embedded is not None and embedded in net) for net in networks):
        return None
    if embedded is not None:
        why = refused_because(embedded)
        return None if why is None else f"IPv4-mapped {embedded}: {why}"
    for net, why in REFUSED:
        if ip in net:
            return f"{why} ({net})"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def check_callback(url: str, allow: Iterable[str] = (),
                   resolve: Callable[[str, int], list[str]] = _resolve) -> Callback:
    """The parsed URL with the addresses it may be delivered to, when every address its host resolves to
    (now, once) may be called; CallbackRefused otherwise, with REFUSED_MESSAGE for whatever depends on DNS
    or on the address (the detail goes to the log)."""
    callback = parse_callback(url)
    networks = allowlist(allow)
    if callback.literal:
        addresses = [callback.host]
    else:
        try:
            addresses = list(resolve(callback.host, callback.port))
        except (OSError, UnicodeError) as e:
            raise _refused(url, f"{callback.host!r} does not resolve ({e})") from None
        if not addresses:
            raise _refused(url, f"{callback.host!r} does not resolve")
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:  # a scoped address (fe80::1%eth0) or not an address at all
            raise _refused(url, f"{callback.host!r} resolves to {text!r}, not a plain IP address") from None
        why = refused_because(ip, networks)
        if why is not None:
            where = "the host" if callback.literal else f"{callback.host!r} resolves to"
            raise _refused(url, f"{where} {text}: {why}; the operator can allow it with webhook_allow")
    return dataclasses.replace(callback, addresses=tuple(addresses))


def _refused(url: str, detail: str) -> CallbackRefused:
    logger.warning("callback_url %r refused: %s", url, detail)
    return CallbackRefused(REFUSED_MESSAGE, detail)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    if not secret:
        raise ValueError("a webhook secret is required to sign a delivery")
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def standard_secret(secret: str) -> str:
    """The key's webhook secret as Standard Webhooks writes secrets: `whsec_` + base64 of the HMAC key."""
    import base64

    return "whsec_" + base64.b64encode(secret.encode()).decode()


def standard_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature`: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">, keyed as `sign`."""
    import base64

    if not secret:
        raise ValueError("a webhook secret is required to sign a delivery")
    mac = hmac.new(secret.encode(), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify_signature(secret: str, body: bytes, timestamp: str, signature: str, tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """What a receiver runs: a signature of the header (one, or one per live secret after a rotation, comma
    separated) matches the raw body and timestamp, and the timestamp is recent. False (never an exception) for
    anything else: an empty secret, a non-ASCII or non-numeric timestamp or signature, a body that is not bytes."""
    if not isinstance(secret, str) or not secret or not isinstance(body, (bytes, bytearray)):
        return False
    if not isinstance(timestamp, str) or not re.fullmatch(r"[0-9]{1,15}", timestamp, re.ASCII):
        return False
    if not isinstance(signature, str) or not signature.isascii():
        return False
    ts = int(timestamp)
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    ours = sign(secret, bytes(body), ts).encode()
    return any(hmac.compare_digest(ours, one.strip().encode()) for one in signature.split(","))


def _abort(conn) -> None:
    """The deadline passed: end the attempt by shutting its socket (wakes a thread blocked in recv)."""
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _post(callback: Callback, address: str, body: bytes, headers: dict, deadline_s: float,
          ca_certs: str | None) -> int:
    """One POST to `address` (a checked one) for `callback`'s name; the receiver's HTTP status."""
    from urllib3.connection import HTTPConnection, HTTPSConnection

    timeout = min(TIMEOUT_S, deadline_s)
    if callback.scheme == "https":
        # connect to the IP; SNI and the certificate's name check use the URL's host name
        name = None if callback.literal else callback.host
        conn = HTTPSConnection(address, callback.port, timeout=timeout, cert_reqs="CERT_REQUIRED",
                               server_hostname=name, assert_hostname=callback.host, ca_certs=ca_certs)
    else:
        conn = HTTPConnection(address, callback.port, timeout=timeout)
    watchdog = threading.Timer(deadline_s, _abort, (conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("POST", callback.target, body=body, headers={**headers, "Host": callback.host_header},
                     preload_content=False)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES, decode_content=False)  # what is left of it is never read
        return response.status
    finally:
        watchdog.cancel()
        conn.close()


def deliver(url: str, payload: dict, secret: str | tuple[str, ...], allow: Iterable[str] = (), attempts: int = ATTEMPTS,
            backoff_s: float = BACKOFF_S, sleep: Callable[[float], None] = time.sleep,
            resolve: Callable[[str, int], list[str]] = _resolve, deadline_s: float = DEADLINE_S,
            ca_certs: str | None = None, event: str = "completed", message_id: str = "") -> dict:
    """POST the payload (a job's public state) as `event`, signed both ways, until a 2xx answer or `attempts`
    tries; returns what happened (no secret, no address, no connection error: those go to the log). The host is
    resolved and checked once, and every attempt connects to an address of that check. `secret`: one, or the
    key's live ones after a rotation (the new first): each header then carries a signature by each."""
    body = json.dumps(payload, sort_keys=True).encode()
    outcome = {"url": url, "attempts": 0, "delivered": False, "status": None, "error": None}
    keys = tuple(s for s in ((secret,) if isinstance(secret, str) else secret) if s)
    if not keys:
        logger.warning("webhook to %r not sent: no webhook secret to sign it with", url)
        outcome["error"] = f"{DELIVERY_FAILED}: the server has no webhook secret to sign it with"
        return outcome
    try:
        callback = check_callback(url, allow, resolve)  # the name may resolve elsewhere now than when posted
    except CallbackRefused as e:
        outcome["error"] = f"{DELIVERY_FAILED}: {e}"
        return outcome
    for attempt in range(attempts):
        if attempt:
            sleep(backoff_s * 2 ** (attempt - 1))
        outcome["attempts"] = attempt + 1
        address = callback.addresses[attempt % len(callback.addresses)]
        ts = int(time.time())
        message_id = message_id or f"{payload.get('id', 'job')}_{event}"
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(ts),
                   SIGNATURE_HEADER: ",".join(sign(k, body, ts) for k in keys), "User-Agent": "emoji-ldm-webhook",
                   EVENT_HEADER: event, "webhook-id": message_id, "webhook-timestamp": str(ts),
                   "webhook-signature": " ".join(standard_signature(k, message_id, ts, body) for k in keys)}
        try:
            status = _post(callback, address, body, headers, deadline_s, ca_certs)
        except Exception as e:  # refused, reset, timed out, TLS: the log says which, the job's state does not
            logger.warning("webhook to %r (%s) attempt %d failed: %s: %s", url, address, attempt + 1,
                           type(e).__name__, e)
            outcome.update(status=None, error=DELIVERY_FAILED)
            continue
        outcome["status"] = status
        if 200 <= status < 300:
            outcome.update(delivered=True, error=None)
            return outcome
        outcome["error"] = f"{DELIVERY_FAILED}: HTTP {status}"
        if 400 <= status < 500 and status not in (408, 429):
            return outcome  # the receiver refuses this delivery: retrying will not change its mind
    logger.warning("webhook to %r not delivered after %d attempts: %s", url, attempts, outcome["error"])
    return outcome
