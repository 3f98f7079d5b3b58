"""API keys: who may call the service, how often, and how many jobs each may have running.

The key file is JSON (a local path or s3://; on Kubernetes the `emoji-ldm-api-keys` Secret mounted as a
file, `k8s/`): per key its name, its id, the SHA-256 of the key, its rate (requests per minute), its
concurrent-jobs quota, whether it is revoked, and its webhook secret. The key itself is printed once by
`emoji-ldm keys create` and kept nowhere; keys are 256 random bits, so a plain SHA-256 stands in for a password
hash. Nothing here logs a key, a hash or a secret. A local key file is written 0600 from its first byte (it
holds the webhook secrets), and `keys.json` is in .gitignore (so `emoji-ldm submit`, which honours it, does
not upload it) and .dockerignore.

A key's id (`key-` and 16 hex digits, made when the key is) never changes and is never reused: jobs and
their results are kept under it (`ApiKey.owner`), not under the name, so a key issued later under a revoked
key's name starts with no jobs. An entry written before ids existed gets one derived from its hash, which is
as fixed and as unique as the key.

The service (`KeyRing`, in the ingress) re-reads the file when it changes (at most every `RELOAD_S`), so a
revoke takes effect within seconds without a restart. A bearer key is checked against every entry with
`hmac.compare_digest`, so the time taken does not depend on which key, or how much of it, matched. Rates are
token buckets per key, counted in the ingress replica (one by default; with N ingress replicas a key gets up
to N times its rate).

    emoji-ldm keys create --file keys.json --name alice [--rate 60] [--max-jobs 2]
    emoji-ldm keys list --file keys.json
    emoji-ldm keys revoke --file keys.json --name alice
    emoji-ldm keys secret --file keys.json [--secret-name emoji-ldm-api-keys]   # a Secret manifest
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError

KEY_PREFIX = "eml_"
RELOAD_S = 2.0
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
KEY_ID = re.compile(r"^key-[0-9a-f]{16}$")


def new_key_id(taken: set[str] = frozenset()) -> str:
    while (key_id := "key-" + secrets.token_hex(8)) in taken:
        pass
    return key_id


def derived_key_id(hash_: str) -> str:
    """The id of an entry written before ids existed: a function of its key's hash, so as fixed as the key."""
    return "key-" + hashlib.sha256(f"emoji-ldm key id:{hash_}".encode()).hexdigest()[:16]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    hash: str
    rate_per_minute: int = 60
    max_jobs: int = 2
    revoked: bool = False
    created_at: str = ""
    webhook_secret: str = ""  # signs this key's webhooks (HMAC-SHA256)
    previous_webhook_secret: str = ""  # after a rotation, signs them too until `previous_until` (ISO time)
    previous_until: str = ""
    id: str = ""              # immutable; derived from the hash for an entry older than ids
    cost_per_minute: int = 20_000  # cost units a minute (images x steps x (size/64)^2, serve/meter.py)
    cost_budget: int = 0      # cost units it may hold for requests and jobs together; 0: an hour of cost_per_minute
    max_stored_bytes: int = 10 * 2**30  # bytes its job results may hold on the service's storage at once
    max_priority: str = "normal"  # the highest job priority it may ask for: high | normal | low

    def __post_init__(self):
        if not self.id:
            object.__setattr__(self, "id", derived_key_id(self.hash))
        elif not KEY_ID.match(self.id):
            raise ValueError(f"key {self.name!r} has id {self.id!r}, not key-<16 hex digits>")
        for field in ("rate_per_minute", "max_jobs", "cost_per_minute", "cost_budget", "max_stored_bytes"):
            value = getattr(self, field)
            if type(value) is not int or value < 0:  # a JSON "10" or true is refused, not read as a number
                raise ValueError(f"key {self.name!r} has {field} {value!r}: a whole number, 0 or more")
        if self.max_priority not in ("high", "normal", "low"):
            raise ValueError(f"key {self.name!r} has max_priority {self.max_priority!r}: high, normal or low")
        if type(self.revoked) is not bool:
            raise ValueError(f"key {self.name!r} has revoked {self.revoked!r}: true or false")

    @property
    def budget(self) -> int:
        """The most cost units the key holds (its `budget:` bucket, serve/meter.py): a job costing more never
        runs."""
        return self.cost_budget or 60 * self.cost_per_minute

    def webhook_secrets(self, now: dt.datetime | None = None) -> tuple[str, ...]:
        """The secrets its webhooks are signed with: the current one, and the one before it while it lives
        (`keys rotate-webhook-secret`), so a receiver can switch over without missing a delivery."""
        now = now or dt.datetime.now(dt.timezone.utc)
        live = self.previous_webhook_secret and self.previous_until and \
            dt.datetime.fromisoformat(self.previous_until) > now
        return tuple(s for s in (self.webhook_secret, self.previous_webhook_secret if live else "") if s)

    @property
    def owner(self) -> str:
        """Whom jobs belong to: the key's id, never its name (a name can be issued again after a revoke)."""
        return self.id

    def public(self) -> dict:
        """What `keys list` shows: no hash, no secret."""
        return {"name": self.name, "id": self.id, "rate_per_minute": self.rate_per_minute,
                "max_jobs": self.max_jobs,
                "cost_per_minute": self.cost_per_minute, "cost_budget": self.budget,
                "max_stored_bytes": self.max_stored_bytes,
                "max_priority": self.max_priority, "revoked": self.revoked, "created_at": self.created_at}


def read_keys(uri: str) -> dict[str, ApiKey]:
    """name -> ApiKey from the key file; {} when it does not exist."""
    from emoji_ldm.store.artifacts import exists, read_bytes

    if not exists(uri):
        return {}
    try:
        data = json.loads(read_bytes(uri).decode())
        keys = [ApiKey(**k) for k in data["keys"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the key file {uri} is not an emoji-ldm key file ({type(e).__name__}: {e}); "
                        "make it with `emoji-ldm keys create`") from None
    for field in ("name", "id"):
        values = [getattr(k, field) for k in keys]
        if len(set(values)) != len(values):
            raise UserError(f"the key file {uri} has two keys of one {field}: each key needs its own; fix the file "
                            "by hand or make a new one with `emoji-ldm keys create`")
    return {k.name: k for k in keys}


def write_keys(uri: str, keys: dict[str, ApiKey]) -> None:
    from emoji_ldm.store.artifacts import write_bytes
    from emoji_ldm.store.uri import is_s3, normalize_uri

    body = {"keys": [dataclasses.asdict(k) for k in sorted(keys.values(), key=lambda k: k.name)]}
    data = (json.dumps(body, indent=2) + "\n").encode()
    if is_s3(uri):
        write_bytes(uri, data)
    else:
        _write_private(normalize_uri(uri), data)


def _write_private(path: str, data: bytes) -> None:
    """Write a local key file at once (beside it, then renamed onto it), its part file 0600 from its first byte
    (it holds the webhook secrets); a file already there keeps its permissions, an operator's own choice."""
    import os
    import uuid

    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    part = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(part, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            pass
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.unlink(part)


# --- the commands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeysCreateConfig:
    file: str = opt(help="the key file (local path or s3://); created if missing")
    name: str = opt(help="who the key is for: lowercase letters, digits, '_', '.', '-'")
    rate: int = opt(60, help="requests per minute")
    max_jobs: int = opt(2, help="jobs this key may have queued or running at once")

    def __post_init__(self):
        if not NAME.match(self.name):
            raise UserError(f"--name {self.name!r}: use 1-63 lowercase letters, digits, '_', '.' or '-'")
        if KEY_ID.match(self.name):
            raise UserError(f"--name {self.name!r} looks like a key id (key-<16 hex digits>): pick another name")
        if not 1 <= self.rate <= 100_000:
            raise UserError(f"--rate must be from 1 to 100000 requests per minute, got {self.rate}")
        if not 0 <= self.max_jobs <= 1000:
            raise UserError(f"--max-jobs must be from 0 to 1000, got {self.max_jobs}")


@dataclass(frozen=True)
class KeysFileConfig:
    file: str = opt(help="the key file (local path or s3://)")


@dataclass(frozen=True)
class KeysRevokeConfig:
    file: str = opt(help="the key file (local path or s3://)")
    name: str = opt(help="the key's name (`emoji-ldm keys list`)")


@dataclass(frozen=True)
class KeysRotateConfig:
    file: str = opt(help="the key file (local path or s3://)")
    name: str = opt(help="the key's name (`emoji-ldm keys list`)")
    keep_hours: float = opt(24.0, help="hours the old webhook secret goes on signing beside the new one (0: none)")

    def __post_init__(self):
        if not 0 <= self.keep_hours <= 24 * 30:
            raise UserError(f"--keep-hours must be from 0 to 720, got {self.keep_hours:g}")


@dataclass(frozen=True)
class KeysSecretConfig:
    file: str = opt(help="the key file (local path or s3://)")
    secret_name: str = opt("emoji-ldm-api-keys", help="the Secret's name (k8s/ mounts emoji-ldm-api-keys)")
    namespace: str = opt("", help="the Secret's namespace (default: kustomize's or kubectl's)")


def create_command(config: KeysCreateConfig) -> str:
    from emoji_ldm.serve.webhooks import standard_secret

    keys = read_keys(config.file)
    if config.name in keys and not keys[config.name].revoked:
        raise UserError(f"a key named {config.name!r} exists in {config.file}: revoke it first, or pick another name")
    key = new_key()
    # a new id even when the name was used before: the revoked key's jobs stay its own
    keys[config.name] = ApiKey(name=config.name, hash=key_hash(key), rate_per_minute=config.rate,
                               max_jobs=config.max_jobs, created_at=dt.datetime.now(dt.timezone.utc).isoformat(
                                   timespec="seconds"), webhook_secret=secrets.token_urlsafe(32),
                               id=new_key_id({k.id for k in keys.values()}))
    write_keys(config.file, keys)
    secret = keys[config.name].webhook_secret
    return (f"key {config.name!r} (id {keys[config.name].id}, {config.rate} requests/min, {config.max_jobs} jobs) "
            f"added to {config.file}.\n"
            f"The key (shown once, stored nowhere; send it as 'Authorization: Bearer KEY'):\n{key}\n"
            f"Its webhook secret (verifies the X-Emoji-Ldm-Signature of its job callbacks):\n{secret}\n"
            f"The same secret as Standard Webhooks verifiers take it (webhook-signature):\n{standard_secret(secret)}")


def list_command(config: KeysFileConfig) -> str:
    keys = read_keys(config.file)
    if not keys:
        return f"no keys in {config.file}"
    rows = [f"{'name':20s} {'id':20s} {'rate/min':>8s} {'jobs':>5s} {'state':8s} created"]
    rows += [f"{k.name:20s} {k.id:20s} {k.rate_per_minute:8d} {k.max_jobs:5d} "
             f"{'revoked' if k.revoked else 'active':8s} {k.created_at}" for k in keys.values()]
    return "\n".join(rows)


def revoke_command(config: KeysRevokeConfig) -> str:
    keys = read_keys(config.file)
    if config.name not in keys:
        raise UserError(f"no key named {config.name!r} in {config.file} (emoji-ldm keys list --file "
                        f"{config.file})")
    keys[config.name] = dataclasses.replace(keys[config.name], revoked=True)
    write_keys(config.file, keys)
    return f"key {config.name!r} revoked in {config.file}; a running service stops taking it within {RELOAD_S:g} s"


def rotate_command(config: KeysRotateConfig) -> str:
    """A new webhook secret for a key; the old one goes on signing beside it for `keep_hours`, so receivers
    switch to the new one in their own time (Standard Webhooks receivers accept any of the signatures sent)."""
    from emoji_ldm.serve.webhooks import standard_secret

    keys = read_keys(config.file)
    if config.name not in keys or keys[config.name].revoked:
        raise UserError(f"no active key named {config.name!r} in {config.file} (emoji-ldm keys list --file "
                        f"{config.file})")
    key = keys[config.name]
    until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=config.keep_hours)
    keys[config.name] = dataclasses.replace(
        key, webhook_secret=secrets.token_urlsafe(32), previous_webhook_secret=key.webhook_secret if
        config.keep_hours else "", previous_until=until.isoformat(timespec="seconds") if config.keep_hours else "")
    write_keys(config.file, keys)
    secret = keys[config.name].webhook_secret
    kept = (f"the old one signs beside it until {until.isoformat(timespec='seconds')}" if config.keep_hours else
            "the old one no longer signs")
    return (f"key {config.name!r}: a new webhook secret ({kept}; a running service takes it within "
            f"{RELOAD_S:g} s):\n{secret}\nThe same secret as Standard Webhooks verifiers take it:\n"
            f"{standard_secret(secret)}")


def secret_command(config: KeysSecretConfig) -> str:
    """The key file as a Kubernetes Secret manifest (stdout: pipe it to `kubectl apply -f -`)."""
    import base64

    from emoji_ldm.store.artifacts import exists, read_bytes

    if not exists(config.file):
        raise UserError(f"no key file at {config.file}: make one with `emoji-ldm keys create`")
    read_keys(config.file)  # a clear error for a file that is not one
    data = base64.b64encode(read_bytes(config.file)).decode()
    namespace = f"\n  namespace: {config.namespace}" if config.namespace else ""
    return (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {config.secret_name}{namespace}\n"
            f"  labels:\n    app.kubernetes.io/name: emoji-ldm\ntype: Opaque\ndata:\n  keys.json: {data}")


# --- the service side -------------------------------------------------------------------------


class AuthError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class KeyRing:
    """The keys of a running service: authenticate a bearer header, and meter each key's requests.

    `spend(bucket, cost, per_minute)` (an async call of `Meter.spend`) keeps the request buckets: the
    service passes the meter actor every ingress replica shares (serve/meter.py), so that N replicas do not give a
    key N rates; by default the buckets are this process's own."""

    def __init__(self, uri: str, clock=time.monotonic, spend=None):
        from emoji_ldm.serve.meter import Meter

        self.uri, self.clock = uri, clock
        if spend is None:
            local = Meter(clock=clock)

            async def spend(bucket: str, cost: float, per_minute: float) -> float:
                return local.spend(bucket, cost, per_minute)
        self.spend = spend
        self._keys: list[ApiKey] = []
        self._signature: tuple | None = None
        self._checked = -RELOAD_S
        self.reload(force=True)
        if not self._keys:
            raise UserError(f"the key file {uri} has no keys: add one with `emoji-ldm keys create --file {uri}`")

    @property
    def active(self) -> int:
        return sum(not k.revoked for k in self._keys)

    def reload(self, force: bool = False) -> None:
        """Re-read the file when it changed (by size and modification time), at most every RELOAD_S."""
        from emoji_ldm.store.uri import filesystem

        now = self.clock()
        if not force and now - self._checked < RELOAD_S:
            return
        self._checked = now
        fs, path = filesystem(self.uri)
        info = fs.get_file_info(path)
        signature = (info.size, info.mtime_ns)
        if force or signature != self._signature:
            self._keys = list(read_keys(self.uri).values())
            self._signature = signature

    def by_name(self, name: str) -> ApiKey | None:
        """The active key of that name. Not for jobs: a name may belong to a later key (`by_owner`)."""
        self.reload()
        return next((k for k in self._keys if k.name == name and not k.revoked), None)

    def by_owner(self, owner: str) -> ApiKey | None:
        """The active key whose jobs these are (`ApiKey.owner`, its id): for work done on its behalf without a
        request, such as a resumed job. None for a revoked key, and for a name."""
        self.reload()
        return next((k for k in self._keys if k.id == owner and not k.revoked), None)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an `Authorization: Bearer KEY` header; AuthError 401 when missing, unknown or revoked."""
        self.reload()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "an API key is required: send 'Authorization: Bearer KEY'",
                            {"WWW-Authenticate": 'Bearer realm="emoji-ldm"'})
        digest = key_hash(token.strip())
        found = None
        for key in self._keys:  # every entry, compare_digest each: no early exit to time
            if hmac.compare_digest(key.hash, digest):
                found = key
        if found is None or found.revoked:
            raise AuthError(401, "this API key is not valid (unknown or revoked)",
                            {"WWW-Authenticate": 'Bearer realm="emoji-ldm", error="invalid_token"'})
        return found

    async def meter(self, key: ApiKey) -> None:
        """Take one request from the key's bucket (its rate per minute, refilled continuously); AuthError 429
        with Retry-After when it is empty."""
        wait = await self.spend(f"requests:{key.id}", 1.0, float(key.rate_per_minute))
        if wait != 0.0:
            retry = max(1, int(wait + 0.999)) if wait > 0 else 60  # -1: a rate below one request a minute
            raise AuthError(429, f"key {key.name!r} is over its rate of {key.rate_per_minute} requests per "
                                 f"minute: retry in {retry} s", {"Retry-After": str(retry)})
