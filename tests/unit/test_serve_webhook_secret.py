"""`emoji-ldm keys create` prints a key's webhook secret both ways: ours, and as Standard Webhooks verifiers take
it (`whsec_` + base64), which keys the same HMAC; after `keys rotate-webhook-secret`, the new and the old sign."""

from __future__ import annotations

import time

from standardwebhooks.webhooks import Webhook

from emoji_ldm.serve.keys import KeysCreateConfig, create_command
from emoji_ldm.serve.webhooks import standard_signature


def test_keys_create_prints_the_secret_as_standard_webhooks_takes_it(tmp_path):
    lines = create_command(KeysCreateConfig(file=str(tmp_path / "keys.json"), name="alice")).splitlines()
    secret, standard = lines[4], lines[6]
    assert standard.startswith("whsec_")
    body, ts = b'{"id":"job-1","state":"succeeded"}', int(time.time())
    headers = {"webhook-id": "job-1_completed", "webhook-timestamp": str(ts),
               "webhook-signature": standard_signature(secret, "job-1_completed", ts, body)}
    assert Webhook(standard).verify(body, headers) == {"id": "job-1", "state": "succeeded"}


def test_a_rotated_secret_signs_beside_the_old_one_until_the_old_one_expires(tmp_path):
    import datetime as dt

    from emoji_ldm.serve.keys import KeysRotateConfig, read_keys, rotate_command

    keys_file = str(tmp_path / "keys.json")
    old = create_command(KeysCreateConfig(file=keys_file, name="alice")).splitlines()[4]
    new = rotate_command(KeysRotateConfig(file=keys_file, name="alice", keep_hours=24)).splitlines()[1]
    key = read_keys(keys_file)["alice"]
    assert key.webhook_secrets() == (new, old) and new != old
    assert key.webhook_secrets(dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=25)) == (new,)
    newest = rotate_command(KeysRotateConfig(file=keys_file, name="alice", keep_hours=0)).splitlines()[1]
    assert read_keys(keys_file)["alice"].webhook_secrets() == (newest,)


def test_a_delivery_signed_by_two_secrets_verifies_with_either_and_not_a_third():
    from emoji_ldm.serve.webhooks import sign, standard_secret, verify_signature

    body, ts = b'{"id":"job-1","state":"succeeded"}', int(time.time())
    both = " ".join(standard_signature(s, "job-1_completed", ts, body) for s in ("new-secret", "old-secret"))
    headers = {"webhook-id": "job-1_completed", "webhook-timestamp": str(ts), "webhook-signature": both}
    ours = ",".join(sign(s, body, ts) for s in ("new-secret", "old-secret"))
    for secret in ("new-secret", "old-secret"):
        assert Webhook(standard_secret(secret)).verify(body, headers)
        assert verify_signature(secret, body, str(ts), ours)
    assert not verify_signature("a-third", body, str(ts), ours)
