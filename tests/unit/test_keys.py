"""API keys: the key file and its commands, authentication, revocation and rates (serve/keys.py)."""

import asyncio
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
        asyncio.run(ring.meter(api_key))
    with pytest.raises(K.AuthError) as e:
        asyncio.run(ring.meter(api_key))
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "10"
    clock.t += 10
    asyncio.run(ring.meter(api_key))  # one token back after 10 s


def test_an_empty_or_broken_key_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no keys"):
        K.KeyRing(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not an emoji-ldm key file"):
        K.KeyRing(str(tmp_path / "bad.json"))


def test_the_key_file_is_never_readable_by_others_not_even_while_written(tmp_path, monkeypatch):
    """The part file is created 0600 (os.open with the mode), not created 0644 and chmodded after: another user
    on the machine cannot open it in between. With umask 0 too."""
    import os
    import stat

    created = []
    real_open = os.open

    def spying_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT and os.fspath(path).endswith(".part"):
            created.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    monkeypatch.setattr(os, "open", spying_open)
    old = os.umask(0)
    try:
        create(tmp_path / "keys.json", "alice")
    finally:
        os.umask(old)
    assert created == [0o600]
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]


def test_a_reused_name_is_a_new_key_id_and_jobs_are_keyed_on_the_id(tmp_path):
    path = tmp_path / "keys.json"
    first = create(path, "alice")
    ring = K.KeyRing(str(path), clock=Clock())
    old = ring.authenticate(f"Bearer {first}")
    assert K.KEY_ID.match(old.id) and old.owner == old.id != "alice"
    assert old.id in K.list_command(K.KeysFileConfig(file=str(path)))
    assert ring.by_owner(old.id) == old and ring.by_owner("alice") is None
    K.revoke_command(K.KeysRevokeConfig(file=str(path), name="alice"))
    second = create(path, "alice")  # the name again, after the revoke
    ring = K.KeyRing(str(path), clock=Clock())
    new = ring.authenticate(f"Bearer {second}")
    assert new.name == "alice" and new.owner != old.owner  # its jobs are under another id: none of the old key's
    assert ring.by_owner(old.owner) is None
    with pytest.raises(K.AuthError):
        ring.authenticate(f"Bearer {first}")


def test_an_entry_from_before_ids_gets_one_from_its_hash(tmp_path):
    path = tmp_path / "keys.json"
    entry = {"name": "old", "hash": K.key_hash("eml_x"), "rate_per_minute": 60, "max_jobs": 2, "revoked": False,
             "created_at": "", "webhook_secret": "s"}
    path.write_text(json.dumps({"keys": [entry]}))
    (key,) = K.read_keys(str(path)).values()
    assert K.KEY_ID.match(key.id) and key.id == K.derived_key_id(entry["hash"])
    assert K.read_keys(str(path))["old"].id == key.id  # the same every time it is read
    create(path, "new")  # writing the file keeps it
    assert K.read_keys(str(path))["old"].id == key.id


def test_ids_are_checked_and_cannot_pass_for_names(tmp_path):
    path = tmp_path / "keys.json"
    with pytest.raises(UserError, match="looks like a key id"):
        K.KeysCreateConfig(file=str(path), name="key-0123456789abcdef")
    entry = {"name": "a", "hash": K.key_hash("eml_a"), "id": "key-0123456789abcdef"}
    path.write_text(json.dumps({"keys": [entry, {**entry, "name": "b", "hash": K.key_hash("eml_b")}]}))
    with pytest.raises(UserError, match="two keys of one id"):
        K.read_keys(str(path))
    path.write_text(json.dumps({"keys": [{**entry, "id": "../../etc"}]}))
    with pytest.raises(UserError, match="not an emoji-ldm key file"):
        K.read_keys(str(path))


def test_key_files_are_ignored_by_git_submit_and_docker():
    """`emoji-ldm submit` uploads the checkout minus what .gitignore lists (Ray honours it); the image build sends
    its context minus .dockerignore."""
    from tests.conftest import REPO

    assert "keys.json" in (REPO / ".gitignore").read_text().splitlines()
    assert {"keys.json", "**/keys.json"} <= set((REPO / ".dockerignore").read_text().splitlines())


def test_rate_buckets_are_per_key_id_not_name(tmp_path):
    """A key issued under a revoked key's name starts with a full bucket of its own."""
    from emoji_ldm.serve.keys import (
        AuthError,
        KeyRing,
        KeysCreateConfig,
        KeysRevokeConfig,
        create_command,
        revoke_command,
    )

    path = str(tmp_path / "keys.json")
    first = create_command(KeysCreateConfig(file=path, name="alice", rate=1)).splitlines()[2]
    ring = KeyRing(path, clock=lambda: 0.0)
    asyncio.run(ring.meter(ring.authenticate(f"Bearer {first}")))
    with pytest.raises(AuthError):
        asyncio.run(ring.meter(ring.authenticate(f"Bearer {first}")))
    revoke_command(KeysRevokeConfig(file=path, name="alice"))
    second = create_command(KeysCreateConfig(file=path, name="alice", rate=1)).splitlines()[2]
    ring.reload(force=True)
    key = ring.authenticate(f"Bearer {second}")
    asyncio.run(ring.meter(key))  # not the revoked key's empty bucket
    assert key.cost_per_minute == 20_000
    assert ring.by_owner(key.id) == key
