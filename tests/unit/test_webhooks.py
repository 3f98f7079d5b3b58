"""Webhook SSRF checks, signatures and the delivery's outcome, without a server and without DNS: the resolver
is injected. Deliveries to real servers on 127.0.0.1 (the pinned address, TLS, deadline, answer cap) are in
tests/integration/test_serve_jobs.py."""

from __future__ import annotations

import socket

import pytest

from emoji_ldm.serve.webhooks import (
    DELIVERY_FAILED,
    REFUSED_MESSAGE,
    CallbackRefused,
    check_callback,
    deliver,
    parse_callback,
    sign,
    verify_signature,
)

PUBLIC = "93.184.215.14"


def resolver(table: dict[str, list[str]]):
    return lambda host, port: table[host]


def everything_public(host, port):
    """A resolver that answers a public address for any name: what an attacker's DNS does at check time."""
    return [PUBLIC]


# --- what a callback may reach ----------------------------------------------------------------------------


@pytest.mark.parametrize("addresses", [["10.0.0.5"], ["169.254.169.254"], ["127.0.0.1"], ["192.168.1.1"],
                                       ["100.64.0.1"], ["::1"], ["fd00:ec2::254"], ["::ffff:10.0.0.1"],
                                       [PUBLIC, "10.0.0.5"], ["0.0.0.0"], ["64:ff9b::a9fe:a9fe"],
                                       ["64:ff9b:1::a00:1"], ["2002:a9fe:a9fe::1"], ["2001:0:a9fe:a9fe::1"],
                                       ["::a9fe:a9fe"], ["fec0::1"], ["ff02::1"], ["224.0.0.251"],
                                       ["fe80::1%eth0"], ["198.18.0.1"], ["not-an-address"]])
def test_a_hostname_resolving_to_an_internal_address_is_refused_without_saying_where(addresses, caplog):
    with pytest.raises(CallbackRefused) as e:
        check_callback("https://hooks.example.com/x", resolve=resolver({"hooks.example.com": addresses}))
    assert str(e.value) == REFUSED_MESSAGE  # the caller learns nothing of the cluster's DNS
    assert addresses[-1].split("%")[0] not in str(e.value)
    assert addresses[-1].split("%")[0] in e.value.detail and "hooks.example.com" in caplog.text  # the log does


@pytest.mark.parametrize("url", [
    "http://[64:ff9b::a9fe:a9fe]/",        # NAT64: 169.254.169.254
    "http://[64:ff9b:1::a9fe:a9fe]/",      # local-use NAT64
    "http://[2002:a9fe:a9fe::1]/",         # 6to4: 169.254.169.254
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
    "http://[::a9fe:a9fe]/",               # IPv4-compatible: 169.254.169.254
    "http://[::ffff:a9fe:a9fe]/",          # IPv4-mapped: judged by the IPv4 inside
    "http://[fec0::1]/",                   # site-local
    "http://[ff02::1]/", "http://224.0.0.1/", "http://239.255.255.250:1900/",  # multicast
    "http://[::]/", "http://0.0.0.0/", "http://[::1]:9/", "http://127.0.0.1/", "http://169.254.169.254/",
    "http://100.64.0.1/", "http://192.0.0.170/", "http://240.0.0.1/", "http://255.255.255.255/",
])
def test_ip_literals_in_refused_ranges_are_refused(url):
    with pytest.raises(CallbackRefused) as e:
        check_callback(url, resolve=everything_public)
    assert str(e.value) == REFUSED_MESSAGE


@pytest.mark.parametrize("url, why", [
    ("http://faß.example/", "ASCII"),                        # IDNA 2003 says fass.example, IDNA 2008 xn--fa-hia
    ("http://ｅxample.com/", "ASCII"),                        # a fullwidth letter, NFKC-folded by IDNA
    ("http://127.0.0.1\\.x.attacker.example/", "backslash"),  # urllib3 ends the host at the backslash
    ("http://attacker.example\\@127.0.0.1/", "backslash"),
    ("http://127.0.0.%31/", "'%'"),                          # percent-decoded to 127.0.0.1 by a client
    ("http://[fe80::1%25eth0]/", "'%'"),                     # an IPv6 zone
    ("http://user@hooks.example.com/", "credentials"),
    ("http://hooks.example.com@127.0.0.1/", "credentials"),
    ("http://2130706433/", "dotted-quad"),                   # decimal 127.0.0.1
    ("http://0177.0.0.1/", "dotted-quad"),                   # octal
    ("http://0x7f.0.0.1/", "dotted-quad"),                   # hex
    ("http://127.1/", "dotted-quad"),                        # short form
    ("http://127.000.000.001/", "dotted-quad"),
    ("http://hooks.example.0x7f/", "dotted-quad"),           # a last label that is a number makes it IPv4
    ("http://hooks.example.com:99999/", "port"), ("http://hooks.example.com:0/", "port"),
    ("http://hooks.example.com:80a/", "DNS name"), ("http://hooks.example.com:-1/", "DNS name"),
    ("http://hooks.example.com /x", "spaces"), ("http://hooks.example.com/\r\nX: y", "control"),
    ("http://under_score.example.com/", "DNS name"), ("http://-x.example.com/", "DNS name"),
    ("http://[not:an:ip]/", "IPv6"), ("ftp://hooks.example.com/", "http"), ("file:///etc/passwd", "http"),
    ("http:///x", "DNS name"), ("hooks.example.com/x", "http"), ("", "http"),
])
def test_hosts_a_client_could_read_otherwise_are_refused_before_dns(url, why):
    asked = []
    with pytest.raises(CallbackRefused, match=why):
        check_callback(url, resolve=lambda host, port: asked.append(host) or [PUBLIC])
    assert asked == []  # refused on its syntax: nothing was resolved
    with pytest.raises(ValueError):  # what the JobRequest's validator calls: a 422 at once
        parse_callback(url)


def test_the_idn_pair_cannot_be_checked_as_one_name_and_sent_to_the_other():
    """A resolver that answers differently for the IDNA 2003 and 2008 forms of faß: the Unicode name is
    refused, and each ASCII form is checked and delivered as itself."""
    table = {"fass.attacker.example": [PUBLIC], "xn--fa-hia.attacker.example": ["10.0.0.7"]}
    with pytest.raises(CallbackRefused, match="ASCII"):
        check_callback("http://faß.attacker.example/", resolve=resolver(table))
    assert check_callback("http://FASS.attacker.example/", resolve=resolver(table)).addresses == (PUBLIC,)
    with pytest.raises(CallbackRefused):
        check_callback("http://xn--fa-hia.attacker.example/", resolve=resolver(table))


def test_public_addresses_and_the_operators_allowlist_pass():
    checked = check_callback("https://Hooks.Example.com./x?a=1#frag", resolve=resolver({"hooks.example.com": [PUBLIC]}))
    assert (checked.host, checked.port, checked.target, checked.addresses) == ("hooks.example.com", 443, "/x?a=1",
                                                                               (PUBLIC,))
    assert check_callback("http://[2606:4700:4700::1111]:8080/hook").addresses == ("2606:4700:4700::1111",)
    assert check_callback("http://127.0.0.1:9000/hook", allow=["127.0.0.1/32"]).addresses == ("127.0.0.1",)
    assert check_callback("http://[::ffff:127.0.0.1]/", allow=["127.0.0.1"])  # mapped: the IPv4 inside
    assert check_callback("http://[fd00::5]/", allow=["fd00::/8"])
    with pytest.raises(CallbackRefused):
        check_callback("http://127.0.0.1:9000/hook")  # loopback without the allowlist
    with pytest.raises(CallbackRefused):
        check_callback("http://127.0.0.2:9000/hook", allow=["127.0.0.1/32"])
    with pytest.raises(ValueError, match="webhook_allow"):
        check_callback("http://127.0.0.1/", allow=["not-a-cidr"])


def test_an_unresolvable_name_is_the_same_generic_refusal():
    def fails(host, port):
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(CallbackRefused) as e:
        check_callback("http://nowhere.internal/", resolve=fails)
    assert str(e.value) == REFUSED_MESSAGE
    with pytest.raises(CallbackRefused) as e:
        check_callback("http://nowhere.internal/", resolve=lambda host, port: [])
    assert str(e.value) == REFUSED_MESSAGE


# --- signatures --------------------------------------------------------------------------------------------


def test_signatures_verify_only_the_exact_body_key_and_recent_time():
    body, ts = b'{"id": "job-1", "state": "succeeded"}', 1_800_000_000
    signature = sign("s3cret", body, ts)
    assert verify_signature("s3cret", body, str(ts), signature, now=ts + 10)
    assert not verify_signature("s3cret", body + b" ", str(ts), signature, now=ts + 10)
    assert not verify_signature("other", body, str(ts), signature, now=ts + 10)
    assert not verify_signature("s3cret", body, str(ts), signature, now=ts + 3600)  # a replay, an hour on
    assert not verify_signature("s3cret", body, "soon", signature, now=ts)


@pytest.mark.parametrize("secret, timestamp, signature", [
    ("s3cret", "1800000000", "v1=é"), ("s3cret", "1800000000", "v1=\udcff"), ("s3cret", "١٨٠٠٠٠٠٠٠٠", None),
    ("s3cret", None, None), ("s3cret", " 1800000000", None),
    ("", "1800000000", None), (None, "1800000000", None),
])
def test_verify_signature_refuses_odd_input_without_raising(secret, timestamp, signature):
    body, ts = b'{"id": "job-1"}', 1_800_000_000
    if signature is None and timestamp is not None and secret == "s3cret":
        signature = sign("s3cret", body, ts)  # a valid signature; the timestamp is what is odd
    assert verify_signature(secret, body, timestamp, signature, now=ts) is False
    assert verify_signature("s3cret", "not bytes", str(ts), sign("s3cret", body, ts), now=ts) is False


def test_an_empty_secret_signs_nothing():
    with pytest.raises(ValueError, match="secret"):
        sign("", b"{}", 1)
    outcome = deliver("http://127.0.0.1:9/hook", {"id": "job-1"}, "", allow=["127.0.0.1/32"], sleep=lambda s: None)
    assert outcome["delivered"] is False and outcome["attempts"] == 0


# --- delivery, without a server ----------------------------------------------------------------------------------


def test_delivery_to_a_refused_address_sends_nothing():
    outcome = deliver("http://10.0.0.1/hook", {"id": "job-1"}, "s3cret", sleep=lambda s: None)
    assert outcome["delivered"] is False and outcome["attempts"] == 0 and REFUSED_MESSAGE in outcome["error"]


def test_a_failed_delivery_says_nothing_a_port_scanner_could_use():
    """A closed port and an HTTP error: the outcome (what GET /v1/jobs/{id} shows) says 'delivery failed' and the
    status, never 'connection refused' or the address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    outcome = deliver(f"http://127.0.0.1:{closed}/", {"id": "job-1"}, "s3cret", allow=["127.0.0.1/32"], attempts=2,
                      sleep=lambda s: None)
    assert outcome == {"url": f"http://127.0.0.1:{closed}/", "attempts": 2, "delivered": False, "status": None,
                       "error": DELIVERY_FAILED}


def test_a_callback_host_that_never_resolves_is_a_400_within_the_deadline(monkeypatch):
    """The lookup runs on the routes' own small pool with a deadline: a name server that never answers costs the
    caller a 400, and the replica's default thread pool (every other blocking call) nothing."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from emoji_ldm.serve import webhooks
    from emoji_ldm.serve.errors import ApiError
    from emoji_ldm.serve.jobs import routes as job_routes

    release = threading.Event()
    monkeypatch.setattr(webhooks, "check_callback", lambda url, allow: release.wait(30))
    monkeypatch.setattr(job_routes, "CALLBACK_CHECK_S", 0.3)
    routes = job_routes.JobRoutes(SimpleNamespace(webhook_allow=[]))
    key = SimpleNamespace(webhook_secret="s")
    try:  # without the deadline: no error, once the lookup gives up after 30 s
        with pytest.raises(ApiError, match="did not resolve within 0.3 s") as refused:
            asyncio.run(routes._check_callback("https://never.example/hook", key))
    finally:
        release.set()
    assert refused.value.status == 400 and refused.value.field == "callback_url"


def test_one_keys_slow_names_do_not_hold_up_another_keys_check(monkeypatch):
    """A tenant whose callback names never resolve holds at most one lookup thread at a time: its fifth post
    waits for its own turn (and gets its 400 at the deadline), while another key's check runs at once."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from emoji_ldm.serve import webhooks
    from emoji_ldm.serve.errors import ApiError
    from emoji_ldm.serve.jobs import routes as job_routes

    release, checked = threading.Event(), []

    def check(url, allow):
        if "slow" in url:
            release.wait(30)
        checked.append(url)

    monkeypatch.setattr(webhooks, "check_callback", check)
    monkeypatch.setattr(job_routes, "CALLBACK_CHECK_S", 0.5)
    routes = job_routes.JobRoutes(SimpleNamespace(webhook_allow=[]))
    slow, quick = SimpleNamespace(webhook_secret="s", owner="key-slow"), SimpleNamespace(webhook_secret="s",
                                                                                       owner="key-quick")

    async def both():
        slow_posts = [routes._check_callback(f"https://slow{i}.example/hook", slow) for i in range(5)]
        results = await asyncio.gather(*slow_posts, routes._check_callback("https://ok.example/hook", quick),
                                       return_exceptions=True)
        return results

    try:
        results = asyncio.run(both())
    finally:
        release.set()
    assert all(isinstance(r, ApiError) and r.status == 400 for r in results[:5])
    assert results[5] is None and checked == ["https://ok.example/hook"]
    assert sum(t.name.startswith("callback-check") and t.is_alive() for t in threading.enumerate()) <= 16
