"""API keys: the key file and its commands, authentication, revocation and rates (serve/keys.py)."""

import json

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.serve import keys as K


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def create(path, name, **kw) -> str:
    out = K.create_command(K.KeysCreateConfig(file=str(path), name=name, **kw))
    return next(line for line in out.splitlines() if line.startswith(K.KEY_PREFIX))


def test_key_file_keeps_hashes_never_keys(tmp_path):
    path = tmp_path / "keys.json"
    key = create(path, "alice", rate=30, max_jobs=1)
    text = path.read_text()
    assert key not in text and K.key_hash(key) in text
    entry = json.loads(text)["keys"][0]
    assert entry["name"] == "alice" and entry["rate_per_minute"] == 30 and entry["webhook_secret"]
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the webhook secrets: its owner's alone
    listing = K.list_command(K.KeysFileConfig(file=str(path)))
    assert "alice" in listing and "active" in listing and "sha256" not in listing and key not in listing
    with pytest.raises(UserError, match="'alice' exists"):
        create(path, "alice")
    path.chmod(0o640)  # an operator's own choice is kept when the file is written again
    K.revoke_command(K.KeysRevokeConfig(file=str(path), name="alice"))
    assert "revoked" in K.list_command(K.KeysFileConfig(file=str(path))) and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no part file left beside it
    create(path, "alice")  # a revoked name may be issued again
    with pytest.raises(UserError, match="'carol'"):
        K.revoke_command(K.KeysRevokeConfig(file=str(path), name="carol"))
    secret = K.secret_command(K.KeysSecretConfig(file=str(path), namespace="emoji"))
    assert "kind: Secret" in secret and "name: emoji-ldm-api-keys" in secret and "keys.json: " in secret


@pytest.mark.parametrize("kw, text", [({"name": "Alice!"}, "'Alice!'"), ({"name": "a", "rate": 0}, "--rate"),
                                      ({"name": "a", "max_jobs": -1}, "--max-jobs")])
def test_create_refuses_bad_values(tmp_path, kw, text):
    with pytest.raises(UserError, match=text):
        K.KeysCreateConfig(file=str(tmp_path / "k.json"), **kw)


def test_authenticate_and_revoke_while_running(tmp_path):
    path = tmp_path / "keys.json"
    alice, bob = create(path, "alice"), create(path, "bob")
    clock = Clock()
    ring = K.KeyRing(str(path), clock=clock)
    assert ring.authenticate(f"Bearer {alice}").name == "alice"
    assert ring.authenticate(f"bearer  {bob}").name == "bob"
    for header in (None, "", alice, "Basic xyz", "Bearer ", "Bearer eml_nope"):
        with pytest.raises(K.AuthError) as e:
            ring.authenticate(header)
        assert e.value.status == 401 and "WWW-Authenticate" in e.value.headers
    K.revoke_command(K.KeysRevokeConfig(file=str(path), name="bob"))
    assert ring.authenticate(f"Bearer {bob}").name == "bob", "not re-read before RELOAD_S"
    clock.t += K.RELOAD_S
    with pytest.raises(K.AuthError, match="unknown or revoked"):
        ring.authenticate(f"Bearer {bob}")
    assert ring.active == 1


def test_rate_is_a_token_bucket_with_retry_after(tmp_path):
    path = tmp_path / "keys.json"
    key = create(path, "alice", rate=6)  # one every 10 s, 6 at once
    clock = Clock()
    ring = K.KeyRing(str(path), clock=clock)
    api_key = ring.authenticate(f"Bearer {key}")
    for _ in range(6):
        ring.meter(api_key)
    with pytest.raises(K.AuthError) as e:
        ring.meter(api_key)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "10"
    clock.t += 10
    ring.meter(api_key)  # one token back after 10 s


def test_an_empty_or_broken_key_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no keys"):
        K.KeyRing(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not an emoji-ldm key file"):
        K.KeyRing(str(tmp_path / "bad.json"))
