"""The one authentication rule of the HTTP service (serve/http.py), in process through the app factory: with
keys, every route needs one whatever the route_prefix (Ray Serve puts it in root_path) except a GET/HEAD of
the page and /healthz; every other spelling an attacker might try is simply not public. Without keys, only
localhost Hosts (DNS rebinding). The cost meter and the job quota's decisions (serve/meter.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import Request

from emoji_ldm.serve.http import new_api
from emoji_ldm.serve.keys import KeyRing, KeysCreateConfig, create_command
from emoji_ldm.serve.meter import Meter, cost_units

PREFIXES = ["", "/emoji", "/a/b"]


def call(app, method: str, path: str, root_path: str = "", headers: dict | None = None, body: bytes = b""):
    """One request through the ASGI app as Ray Serve's proxy makes it: the full path in `path`, the route
    prefix in `root_path`. Returns (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": root_path, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in
                         {"host": "127.0.0.1:8000", "content-length": str(len(body)), **(headers or {})}.items()]}
    sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, data


@pytest.fixture
def keyed(tmp_path):
    """An app with keys and a route of each kind; `ran` counts the handlers that ran."""
    path = str(tmp_path / "keys.json")
    key = create_command(KeysCreateConfig(file=path, name="alice", rate=100_000)).splitlines()[2]
    ring = KeyRing(path)
    app, ran = _app(ring)
    return {"app": app, "ran": ran, "key": key, "ring": ring}


def _app(ring, local_only: bool = False):
    api = new_api(ring, local_only=local_only)
    ran = []

    async def page():
        ran.append("page")
        return {"page": True}

    async def healthz():
        ran.append("healthz")
        return {"status": "ok"}

    async def generate(request: Request):
        ran.append("generate")
        key = request.scope.get("state", {}).get("api_key")
        return {"owner": key.owner if key else None}

    async def model():
        ran.append("model")
        return {"model": "m"}

    api.get("/")(page)
    api.get("/healthz")(healthz)
    api.post("/v1/generate")(generate)
    api.get("/v1/model")(model)
    return api, ran


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_route_prefix_does_not_open_the_api(keyed, prefix):
    """The issue's case: with route_prefix /emoji, Ray moves the prefix into root_path and the old check
    (`path.startswith("/v1/")`) let /emoji/v1/generate through without a key."""
    status, headers, body = call(keyed["app"], "POST", f"{prefix}/v1/generate", prefix, body=b"{}")
    assert status == 401 and "API key" in json.loads(body)["error"], body
    assert headers["www-authenticate"].startswith("Bearer")
    assert call(keyed["app"], "GET", f"{prefix}/v1/model", prefix)[0] == 401
    assert keyed["ran"] == []
    status, _, body = call(keyed["app"], "POST", f"{prefix}/v1/generate", prefix,
                           {"authorization": f"Bearer {keyed['key']}"}, b"{}")
    assert status == 200 and json.loads(body)["owner"].startswith("key-")
    assert keyed["ran"] == ["generate"]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("method,path", [
    ("POST", "//v1/generate"), ("POST", "/v1/generate/"), ("POST", "/v1//generate"), ("POST", "/V1/generate"),
    ("POST", "/./v1/generate"), ("POST", "/%2Fv1/generate"), ("POST", "/healthz/../v1/generate"),
    ("HEAD", "/v1/model"), ("OPTIONS", "/v1/generate"), ("GET", "/v1/generate"), ("PUT", "/v1/generate"),
    ("POST", "/healthz"), ("POST", "/"), ("GET", "/healthz/"), ("GET", "//healthz"), ("GET", "/healthz%00"),
    ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/docs/oauth2-redirect"),
    ("GET", "/nope"), ("GET", "/static/x.js"),
])
def test_no_other_spelling_method_or_path_is_public(keyed, prefix, method, path):
    """Deny by default: anything but a GET/HEAD of exactly the page or /healthz below root_path needs a key, so
    a double or trailing slash, a case change, a dot segment, an encoded slash, another method or an unknown
    path is a 401 before any handler runs (and before the body is read)."""
    status, _, body = call(keyed["app"], method, prefix + path, prefix, body=b"{}")
    assert status == 401, (status, body)
    assert keyed["ran"] == []


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_page_and_healthz_stay_open(keyed, prefix):
    assert call(keyed["app"], "GET", f"{prefix}/healthz", prefix)[0] == 200
    assert call(keyed["app"], "GET", f"{prefix}/", prefix)[0] == 200
    assert keyed["ran"] == ["healthz", "page"]


def test_a_path_outside_root_path_is_not_public_by_its_tail(keyed):
    """A path that does not start with root_path is judged whole: /emojihealthz is not /emoji + /healthz."""
    assert call(keyed["app"], "GET", "/emojihealthz", "/emoji")[0] == 401
    assert call(keyed["app"], "GET", "/other/healthz", "/emoji")[0] == 401


def test_with_keys_no_docs_page_and_the_schema_needs_a_key(keyed):
    """/docs would load JavaScript from a CDN into a page that holds a key: not served with keys."""
    auth = {"authorization": f"Bearer {keyed['key']}"}
    assert call(keyed["app"], "GET", "/docs", "", auth)[0] == 404
    assert call(keyed["app"], "GET", "/redoc", "", auth)[0] == 404
    assert call(keyed["app"], "GET", "/openapi.json")[0] == 401
    status, _, body = call(keyed["app"], "GET", "/openapi.json", "", auth)
    assert status == 200 and "/v1/generate" in json.loads(body)["paths"]
    open_app, _ = _app(None)
    assert call(open_app, "GET", "/docs")[0] == 200


def test_a_revoked_key_is_refused_at_once(keyed, tmp_path):
    from emoji_ldm.serve.keys import KeysRevokeConfig, revoke_command

    revoke_command(KeysRevokeConfig(file=keyed["ring"].uri, name="alice"))
    keyed["ring"].reload(force=True)
    status, _, _ = call(keyed["app"], "POST", "/emoji/v1/generate", "/emoji",
                        {"authorization": f"Bearer {keyed['key']}"}, b"{}")
    assert status == 401 and keyed["ran"] == []


@pytest.mark.parametrize("host,status", [
    ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("localhost", 200), ("[::1]:8000", 200),
    ("LOCALHOST:8000", 200), ("attacker.example", 403), ("attacker.example:8000", 403),
    ("127.0.0.1.attacker.example", 403), ("localhost.attacker.example:8000", 403), ("", 403),
    ("10.0.0.5:8000", 403), ("[::1].attacker.example", 403),
])
def test_a_local_server_without_keys_answers_only_localhost_hosts(host, status):
    """DNS rebinding: a page on attacker.example whose name is pointed at 127.0.0.1 sends its own Host."""
    app, ran = _app(None, local_only=True)
    got, _, body = call(app, "POST", "/v1/generate", "", {"host": host}, b"{}")
    assert got == status, body
    assert ran == (["generate"] if status == 200 else [])


def test_an_insecure_server_without_keys_answers_any_host():
    app, _ = _app(None, local_only=False)
    assert call(app, "POST", "/v1/generate", "", {"host": "emoji.example.com"}, b"{}")[0] == 200


# --- the meter (serve/meter.py) without Ray: a clock and the live runners injected ---------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_cost_is_images_times_steps_times_pixels():
    assert cost_units(1, 2) == 2 and cost_units(16, 100) == 1600
    assert cost_units(1, 25, 64) == 25 and cost_units(1, 25, 512) == 25 * 64
    assert cost_units(1, 25, 32) == 25  # an image of 64 px or less costs its steps


def test_a_request_without_a_size_pays_for_the_models_own():
    """The cost is charged at the size drawn: leaving `size` out of a request to a 512 px model was 64 times
    cheaper than asking for 512."""
    from starlette.requests import Request

    from emoji_ldm.serve.app import Ingress
    from emoji_ldm.serve.errors import ApiError
    from emoji_ldm.serve.keys import ApiKey

    class Generator:
        class model_card:
            @staticmethod
            async def remote():
                return {"image_size": 512}

    cls = Ingress.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper
    ingress = object.__new__(cls)
    cls.__init__(ingress, Generator(), {"model": "unused", "max_batch_size": 4})
    key = ApiKey(name="k", hash="0" * 64, cost_per_minute=1000)
    request = Request({"type": "http", "headers": [], "method": "POST", "path": "/v1/generate",
                       "state": {"api_key": key}})
    for size in (None, 512):  # 1 image x 20 steps x (512/64)^2 = 1280 units, more than the key's minute
        with pytest.raises(ApiError, match="costs 1280 units") as refused:
            asyncio.run(ingress._charge(request, 1, 20, size))
        assert refused.value.status == 429


def test_the_cost_bucket_charges_by_cost_not_requests():
    clock = Clock()
    meter = Meter(clock=clock, live=lambda owner: set())
    budget = 2000
    assert meter.spend("key-a", cost_units(16, 100), budget) == 0   # 1600 of 2000
    wait = meter.spend("key-a", cost_units(16, 100), budget)        # 400 left: refused, nothing taken
    assert wait == pytest.approx((1600 - 400) * 60 / budget)
    for _ in range(200):                                             # the cheap requests still fit
        assert meter.spend("key-a", cost_units(1, 2), budget) == 0
    assert meter.spend("key-a", cost_units(1, 2), budget) > 0
    assert meter.spend("key-b", cost_units(16, 100), budget) == 0   # per key
    assert meter.spend("key-a", cost_units(64, 1000), budget) == -1  # more than a whole minute: never
    clock.t += 60
    assert meter.spend("key-a", cost_units(16, 100), budget) == 0   # refilled


def test_job_admission_counts_live_and_admitted_jobs():
    clock, live = Clock(), set()
    meter = Meter(clock=clock, live=lambda owner: set(live) if owner == "key-a" else set())
    assert meter.admit("key-a", "job-1", 1)
    assert not meter.admit("key-a", "job-2", 1)       # job-1 admitted, its runner not up yet
    assert meter.admit("key-a", "job-1", 1)           # the same job again (a replay)
    assert meter.admit("key-b", "job-3", 1)
    live.add("job-1")
    meter.started("key-a", "job-1")
    assert not meter.admit("key-a", "job-2", 1)       # job-1 running
    live.clear()                                      # it ended: its runner is gone
    assert meter.admit("key-a", "job-2", 1)
    clock.t += 1000                                   # an admission whose runner never came up lapses
    assert meter.admit("key-a", "job-4", 1)
    assert meter.admit("key-a", "job-5", None)        # no quota (no keys)


# --- retention (serve/jobs/retention.py): what a key's jobs and sets leave behind is deleted after the period ------


def test_retention_deletes_old_jobs_and_sets_but_not_running_or_recent_ones(tmp_path):
    import os
    import time
    from collections.abc import Iterator

    from emoji_ldm.serve.jobs.retention import expire_jobs, expire_sets, iter_objects

    jobs, sets = tmp_path / "jobs", tmp_path / "sets"
    old = time.time() - 8 * 86400
    a, b = "key-00000000000000aa", "key-00000000000000bb"  # key ids, job and set ids as the service names them
    j_old, j_old2, j_run = "job-20261101-000000-0000000a", "job-20261101-000000-0000000b", "job-0123456789abcdef"
    j_new, j_mixed = "job-20261101-000000-0000000c", "job-20261101-000000-0000000d"
    s_old, s_new = "set-20261101-000000-0000000a", "set-20261101-000000-0000000b"
    files = {jobs / a / j_old / "state.json": old, jobs / a / j_old / "images" / "00000.png": old,
             jobs / a / j_old2 / "state.json": old,
             jobs / a / j_run / "state.json": old, jobs / "_active" / a / j_run: old,
             jobs / b / j_new / "state.json": time.time(),
             jobs / b / j_mixed / "images" / "00000.png": old,
             jobs / b / j_mixed / "state.json": time.time(),  # still being written: kept whole
             sets / s_old / "manifest.json": old, sets / s_old / "a.png": old,
             sets / s_new / "manifest.json": time.time()}
    for path, mtime in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert isinstance(iter_objects(str(jobs)), Iterator)  # streamed, not a list
    assert expire_jobs(str(jobs), 7) == 2
    assert expire_sets(str(sets), 7) == 1
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([f"jobs/_active/{a}/{j_run}", f"jobs/{a}/{j_run}/state.json",
                           f"jobs/{b}/{j_mixed}/images/00000.png", f"jobs/{b}/{j_mixed}/state.json",
                           f"jobs/{b}/{j_new}/state.json", f"sets/{s_new}/manifest.json"])
    assert not (jobs / a / j_old).exists() and not (sets / s_old).exists()
    assert expire_jobs(str(jobs), 7, now=time.time() + 30 * 86400) == 2  # the unfinished one stays
