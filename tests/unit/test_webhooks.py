"""Webhook SSRF checks and signatures, without a network: the resolver is given."""

from __future__ import annotations

import pytest

from emoji_ldm.serve.webhooks import CallbackRefused, check_callback, deliver, sign, verify_signature


def resolver(table: dict[str, list[str]]):
    return lambda host, port: table[host]


@pytest.mark.parametrize("addresses", [["10.0.0.5"], ["169.254.169.254"], ["127.0.0.1"], ["192.168.1.1"],
                                       ["100.64.0.1"], ["::1"], ["fd00:ec2::254"], ["::ffff:10.0.0.1"],
                                       ["93.184.215.14", "10.0.0.5"], ["0.0.0.0"]])
def test_a_hostname_resolving_to_an_internal_address_is_refused(addresses):
    with pytest.raises(CallbackRefused, match="not a public address"):
        check_callback("https://hooks.example.com/x", resolve=resolver({"hooks.example.com": addresses}))


def test_public_addresses_and_the_operators_allowlist_pass():
    assert check_callback("https://hooks.example.com/x", resolve=resolver({"hooks.example.com": ["93.184.215.14"]}))
    assert check_callback("http://127.0.0.1:9000/hook", allow=["127.0.0.1/32"])
    with pytest.raises(CallbackRefused):
        check_callback("http://127.0.0.1:9000/hook")  # loopback without the allowlist
    with pytest.raises(CallbackRefused, match="http"):
        check_callback("file:///etc/passwd")
    with pytest.raises(ValueError, match="webhook_allow"):
        check_callback("http://127.0.0.1/", allow=["not-a-cidr"])


def test_signatures_verify_only_the_exact_body_key_and_recent_time():
    body, ts = b'{"id": "job-1", "state": "succeeded"}', 1_800_000_000
    signature = sign("s3cret", body, ts)
    assert verify_signature("s3cret", body, str(ts), signature, now=ts + 10)
    assert not verify_signature("s3cret", body + b" ", str(ts), signature, now=ts + 10)
    assert not verify_signature("other", body, str(ts), signature, now=ts + 10)
    assert not verify_signature("s3cret", body, str(ts), signature, now=ts + 3600)  # a replay, an hour on
    assert not verify_signature("s3cret", body, "soon", signature, now=ts)


def test_delivery_to_a_refused_address_sends_nothing():
    outcome = deliver("http://10.0.0.1/hook", {"id": "job-1"}, "s3cret", sleep=lambda s: None)
    assert outcome["delivered"] is False and outcome["attempts"] == 1 and "not a public" in outcome["error"]
