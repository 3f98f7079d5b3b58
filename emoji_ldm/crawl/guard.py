"""The crawler's image fetches reach only public addresses (an SSRF guard): a third-party page chooses the image
URLs, and one that names the cloud metadata service, a pod of the cluster or a file on the crawler's disk must not
have the crawler fetch it.

    http(s) URL, every address its host resolves to public     fetched
    the page's own host, named by a literal IP or localhost     fetched (an operator crawling a local site)
    anything else (file:, a private/loopback/link-local/...    dropped, and counted in the log
    address on another host, a name that does not resolve)

`ipaddress`'s `is_global` decides what is public (an IPv4-mapped IPv6 address by the IPv4 inside). The check is
made in the thread that downloads the page's images, not the one that reads pages. It resolves the name once
before the download, which resolves it again: a name server that answers public then private (DNS rebinding) is
not stopped here, and redirects are followed by the downloader; docs/serving.md says what fences the rest (the
crawl pods' egress policy).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost"})


def _address(host: str):
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def _public(host: str, resolve=socket.getaddrinfo) -> bool:
    ip = _address(host)
    if ip is not None:
        return ip.is_global
    try:
        infos = resolve(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    found = [_address(info[4][0].split("%")[0]) for info in infos]
    return bool(found) and all(a is not None and a.is_global for a in found)


def may_fetch(url: str, page_url: str, resolve=socket.getaddrinfo) -> bool:
    """Whether the crawler may download `url`, an image found on `page_url` (`resolve`: getaddrinfo)."""
    try:
        parts, page = urlsplit(url), urlsplit(page_url or "")
        host, page_host = (parts.hostname or "").lower(), (page.hostname or "").lower()
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host == page_host and (host in LOCAL_NAMES or _address(host) is not None):
        return True  # the operator's own local site: its page names itself
    return _public(host, resolve)
