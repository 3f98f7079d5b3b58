"""`emoji-ldm keys create` prints a key's webhook secret both ways: ours, and as Standard Webhooks verifiers take
it (`whsec_` + base64), which keys the same HMAC."""

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
