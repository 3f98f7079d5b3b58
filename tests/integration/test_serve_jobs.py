"""Durable jobs over HTTP on real servers: the Serve app with API keys, job state in moto S3, a webhook
receiver on 127.0.0.1 that verifies signatures. Keys, quotas, idempotency, SSRF, a Serve restart, cancel; and
webhook deliveries to real servers (pinned address, TLS name, deadline, answer cap), which need neither."""

from __future__ import annotations

import datetime as dt
import io
import json
import socket
import ssl
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from emoji_ldm.serve.webhooks import (
    DELIVERY_FAILED,
    MAX_RESPONSE_BYTES,
    REFUSED_MESSAGE,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    check_callback,
    deliver,
    verify_signature,
)
from tests.serving import HTTP, deploy, get, post, stop_runners, wait_for
from tests.tiny_models import tiny_model_with_card

pytestmark = pytest.mark.s3


class Receiver:
    """A webhook receiver: answers 500 to the first delivery (the sender must retry), 200 after; keeps bodies."""

    def __init__(self):
        self.deliveries: list[tuple[dict, bytes]] = []
        self.failures_left = 1
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.failures_left:
                    receiver.failures_left -= 1
                    self.send_response(500)
                else:
                    receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def make_keys(path: str) -> dict[str, tuple[str, str, str]]:
    """name -> (key, webhook secret, key id), made as `emoji-ldm keys create` makes them; `thrifty` may spend 100
    cost units a minute (set in the file by hand, as an operator would)."""
    import dataclasses
    import re

    from emoji_ldm.serve.keys import KeysCreateConfig, create_command, read_keys, write_keys

    made = {}
    for name, flags in (("alice", {"max_jobs": 4}), ("bob", {}), ("solo", {"max_jobs": 2}), ("slow", {"rate": 2}),
                        ("one", {"max_jobs": 1}), ("gone", {}), ("thrifty", {})):
        lines = create_command(KeysCreateConfig(file=path, name=name, **flags)).splitlines()
        made[name] = (lines[2], lines[4], re.search(r"\(id (key-[0-9a-f]{16})", lines[0]).group(1))
    keys = read_keys(path)
    keys["thrifty"] = dataclasses.replace(keys["thrifty"], cost_per_minute=100)
    write_keys(path, keys)
    return made


def key_id(app, name: str) -> str:
    """The key's immutable id: where its jobs live (<jobs_uri>/<id>/<job>) and what its runners are named by."""
    return app["keys"][name][2]


@pytest.fixture(scope="module")
def app(s3_server, ray_local, tmp_path_factory):
    from ray import serve

    s3_server.client().create_bucket(Bucket="jobs")
    root = tmp_path_factory.mktemp("jobs")
    model = str(tiny_model_with_card(root / "model"))
    keys = make_keys(str(root / "keys.json"))
    args = {"keys": str(root / "keys.json"), "jobs_uri": "s3://jobs/emoji", "job_num_cpus": 0.5,
            "webhook_allow": ["127.0.0.1/32"], "sweep_s": 1.0}
    url = deploy(model, max_batch_size=2, ingress={"num_replicas": 2}, **args)  # limits hold across replicas
    receiver = Receiver()
    yield {"url": url, "model": model, "keys": keys, "args": args, "receiver": receiver,
           "keyfile": str(root / "keys.json")}
    receiver.server.shutdown()
    serve.shutdown()
    stop_runners()


def auth(app, name: str) -> dict:
    return {"authorization": f"Bearer {app['keys'][name][0]}"}


def set_body(n: int = 3, **extra) -> dict:
    return {"theme": "blob", "items": [f"item {i}" for i in range(n)], "steps": 2, **extra}


def finished(app, job_id: str, name: str = "alice", timeout: float = 120) -> dict:
    def ended():
        state = json.loads(get(f"{app['url']}/v1/jobs/{job_id}", auth(app, name)).data)
        return state if state["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(ended, timeout, f"job {job_id} to end")


def delete(url: str, headers: dict):
    return HTTP.request("DELETE", url, headers=headers)


def test_jobs_need_a_valid_key_within_its_rate(app):
    url = f"{app['url']}/v1/jobs"
    for headers in ({}, {"authorization": "Bearer eml_not-a-key"}, {"authorization": "Basic abc"}):
        answer = post(url, set_body(), headers)
        assert answer.status == 401 and "error" in json.loads(answer.data)
    # rate 2/min for the key, whichever of the two ingress replicas a request reaches: the 3rd is over, the body
    # unread (with a bucket per replica, about 4 of 12 passed)
    codes = [post(url, {"items": []}, auth(app, "slow")).status for _ in range(12)]
    assert codes[:2] == [422, 422] and set(codes[2:]) == {429}, codes
    answer = post(url, {"items": []}, auth(app, "slow"))
    assert int(answer.headers["Retry-After"]) >= 1


def test_set_job_runs_to_a_zip_and_a_signed_webhook(app):
    from emoji_ldm.serve.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature

    receiver = app["receiver"]
    answer = post(f"{app['url']}/v1/jobs", set_body(3, target="slack", callback_url=receiver.url), auth(app, "alice"))
    assert answer.status == 202, answer.data
    job = json.loads(answer.data)
    assert job["state"] == "queued" and job["progress"] == {"done": 0, "total": 3}
    assert answer.headers["Location"] == f"/v1/jobs/{job['id']}"
    # another key cannot see it, nor fetch its result
    for path in ("", "/result.zip", "/manifest.json"):
        assert get(f"{app['url']}/v1/jobs/{job['id']}{path}", auth(app, "bob")).status == 404
    state = finished(app, job["id"])
    assert state["state"] == "succeeded" and state["progress"] == {"done": 3, "total": 3}
    assert not state["partial"] and state["errors"] == []
    assert state["result"]["zip"] == f"/v1/jobs/{job['id']}/result.zip"
    assert state["result"]["uri"].startswith(f"s3://jobs/emoji/{key_id(app, 'alice')}/")  # the id, not the name
    archive = zipfile.ZipFile(io.BytesIO(get(f"{app['url']}{state['result']['zip']}", auth(app, "alice")).data))
    names = sorted(n.split("/", 1)[1] for n in archive.namelist())
    assert names == ["item_0_blob.png", "item_1_blob.png", "item_2_blob.png", "manifest.json", "sheet.png"]
    manifest = json.loads(get(f"{app['url']}{state['result']['manifest']}", auth(app, "alice")).data)
    assert manifest["id"] == job["id"] and manifest["partial"] is False and manifest["target"]["size"] == 128
    assert [i["seed"] for i in manifest["items"]] == [0, 0, 0]
    # the webhook: retried after the receiver's 500, signed with alice's secret, the job's final state
    wait_for(lambda: receiver.deliveries, 30, "the webhook")
    headers, body = receiver.deliveries[-1]
    secret = app["keys"]["alice"][1]
    assert verify_signature(secret, body, headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()])
    assert not verify_signature(secret, body.replace(b"succeeded", b"failed"), headers[TIMESTAMP_HEADER.lower()],
                                headers[SIGNATURE_HEADER.lower()])
    assert not verify_signature(app["keys"]["bob"][1], body, headers[TIMESTAMP_HEADER.lower()],
                                headers[SIGNATURE_HEADER.lower()])
    delivered = json.loads(body)
    assert delivered["id"] == job["id"] and delivered["state"] == "succeeded"
    # and with the Standard Webhooks reference verifier, given the secret as that spec writes it
    from standardwebhooks.webhooks import Webhook

    from emoji_ldm.serve.webhooks import standard_secret

    assert Webhook(standard_secret(secret)).verify(body, headers) == delivered
    assert headers["webhook-id"] == f"{job['id']}_completed"
    # the runner records the delivery after the receiver has answered: wait for that write, not just the POST
    callback = wait_for(lambda: json.loads(get(f"{app['url']}/v1/jobs/{job['id']}", auth(app, "alice")).data)
                        ["callback"], 30, "the delivery's record")
    assert callback["delivered"] and callback["attempts"] == 2
    # a new webhook secret: a redelivery is signed by both while the old one lives, and keeps its webhook-id
    from emoji_ldm.serve.keys import RELOAD_S, KeysRotateConfig, rotate_command

    rotated = rotate_command(KeysRotateConfig(file=app["keyfile"], name="alice")).splitlines()
    new_secret = rotated[1]

    def redelivered():
        answer = post(f"{app['url']}/v1/jobs/{job['id']}/redeliver", b"", auth(app, "alice"))
        assert answer.status == 200 and json.loads(answer.data)["callback"]["delivered"], answer.data
        headers, body = receiver.deliveries[-1]
        return (headers, body) if verify_signature(new_secret, body, headers[TIMESTAMP_HEADER.lower()],
                                                   headers[SIGNATURE_HEADER.lower()]) else None

    time.sleep(RELOAD_S + 1)  # every ingress replica has the new key file: one redelivery, two at most
    headers, body = wait_for(redelivered, 8, "a redelivery signed with the new secret (the key file reloads)", 4)
    for one in (secret, new_secret):
        assert Webhook(standard_secret(one)).verify(body, headers) == delivered
        assert verify_signature(one, body, headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()])
    assert headers["webhook-id"] == f"{job['id']}_completed"
    plain = post(f"{app['url']}/v1/jobs", set_body(1), auth(app, "alice"))
    again = post(f"{app['url']}/v1/jobs/{json.loads(plain.data)['id']}/redeliver", b"", auth(app, "alice"))
    assert again.status == 409 and "no callback_url" in json.loads(again.data)["error"], again.data


def test_idempotency_keys_replay_conflict_and_race(app):
    url = f"{app['url']}/v1/jobs"
    first = post(url, set_body(1), {**auth(app, "alice"), "Idempotency-Key": "order-1"})
    again = post(url, set_body(1), {**auth(app, "alice"), "Idempotency-Key": "order-1"})
    assert first.status == again.status == 202
    assert json.loads(first.data)["id"] == json.loads(again.data)["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    changed = post(url, set_body(2), {**auth(app, "alice"), "Idempotency-Key": "order-1"})
    assert changed.status == 409 and "different body" in json.loads(changed.data)["error"]
    # the same header under another key is another job
    bobs = post(url, set_body(1), {**auth(app, "bob"), "Idempotency-Key": "order-1"})
    assert bobs.status == 202 and json.loads(bobs.data)["id"] != json.loads(first.data)["id"]
    # ten concurrent duplicates: one job
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: post(url, set_body(1), {**auth(app, "alice"), "Idempotency-Key": "race"}),
                                range(10)))
    assert {a.status for a in answers} == {202}
    ids = {json.loads(a.data)["id"] for a in answers}
    assert len(ids) == 1
    assert finished(app, ids.pop())["state"] == "succeeded"


@pytest.mark.parametrize("callback", ["http://169.254.169.254/latest/meta-data", "http://10.1.2.3/hook",
                                      "http://[::1]:9/hook", "http://[64:ff9b::a9fe:a9fe]/", "http://[2002:a9fe:a9fe::1]/",
                                      "http://[::a9fe:a9fe]/", "http://[fec0::1]/", "http://[ff02::1]/"])
def test_callbacks_to_internal_addresses_are_refused(app, callback):
    """A 400 that says only that the URL is not allowed: never where its host resolved (an oracle for the
    cluster's DNS)."""
    answer = post(f"{app['url']}/v1/jobs", set_body(1, callback_url=callback), auth(app, "alice"))
    assert answer.status == 400 and json.loads(answer.data)["field"] == "callback_url", answer.data
    assert json.loads(answer.data)["error"] == REFUSED_MESSAGE, answer.data


@pytest.mark.parametrize("callback", ["ftp://127.0.0.1/x", "http://user:pw@127.0.0.1/x", "http://faß.example/",
                                      "http://127.0.0.1\\.x.example/", "http://127.0.0.%31/", "http://2130706433/",
                                      "http://0177.0.0.1/", "http://127.1/", "http://example.com:99999/"])
def test_callbacks_a_client_could_parse_otherwise_are_a_422(app, callback):
    answer = post(f"{app['url']}/v1/jobs", set_body(1, callback_url=callback), auth(app, "alice"))
    assert answer.status == 422 and json.loads(answer.data)["field"] == "callback_url", answer.data


def test_bad_job_bodies_name_the_field(app):
    url, headers = f"{app['url']}/v1/jobs", auth(app, "alice")
    for body, field in (({"items": ["a"], "prompts": ["b"]}, None), ({"prompts": ["a"], "per_prompt": 99},
                                                                      "per_prompt"),
                        ({"items": ["a"], "steps": 0}, "steps"), ({"items": ["a"], "nope": 1}, "nope")):
        answer = post(url, body, headers)
        assert answer.status == 422 and json.loads(answer.data)["field"] == field, answer.data
    assert get(f"{app['url']}/v1/jobs/job-20260101-000000-00000000", headers).status == 404
    assert get(f"{app['url']}/v1/jobs/../../keys", headers).status == 404


def test_an_unreadable_job_state_is_a_json_500(app, s3_server):
    """A state.json that is not JSON (storage damaged by hand): a JSON 500 naming the error's kind, never
    Starlette's plain-text page."""
    job_id = "job-20260101-000000-0badf00d"
    s3_server.client().put_object(Bucket="jobs", Key=f"emoji/{key_id(app, 'bob')}/{job_id}/state.json",
                                  Body=b"{not json")
    answer = get(f"{app['url']}/v1/jobs/{job_id}", auth(app, "bob"))
    assert answer.status == 500 and "JSONDecodeError" in json.loads(answer.data)["error"], answer.data


def test_retention_streams_a_listing_longer_than_a_page_and_keeps_running_jobs(s3_server):
    """Job folders past the retention period are deleted from S3 while the listing streams by (1000 keys a
    page: 1005 objects take two), and a running job's folder (its _active marker) is kept."""
    from emoji_ldm.serve.jobs.retention import expire_jobs, iter_objects

    client = s3_server.client()
    client.create_bucket(Bucket="retain")
    for i in range(1005):
        folder = f"jobs/key-00000000000000aa/job-20261101-000000-{i // 100:08x}"
        client.put_object(Bucket="retain", Key=f"{folder}/images/{i:05d}.png", Body=b"x")
    client.put_object(Bucket="retain", Key="jobs/_active/key-00000000000000aa/job-20261101-000000-00000000", Body=b"")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="retain", Prefix="jobs/")
    assert len(list(pages)) == 2
    assert sum(1 for _ in iter_objects("s3://retain/jobs")) == 1006
    assert expire_jobs("s3://retain/jobs", 7) == 0  # nothing is old yet
    assert expire_jobs("s3://retain/jobs", 7, now=time.time() + 8 * 86400) == 10
    left = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="retain")
            for o in page.get("Contents", [])]
    assert len(left) == 101 and all("job-20261101-000000-00000000" in k for k in left)


def test_a_job_outlives_a_serve_restart_and_cancel_marks_partial_output(app):
    """Two jobs: one keeps running while the app is deleted and deployed again, and finishes; the other's runner
    is killed meanwhile, and the new ingress resumes it; the key's quota of two holds; the resumed one is
    cancelled: its zip says partial."""
    import ray
    from ray import serve

    from emoji_ldm.serve.jobs.store import job_folder, read_state
    from emoji_ldm.serve.placement import NAMESPACE, runner

    url, solo = f"{app['url']}/v1/jobs", auth(app, "solo")
    short = json.loads(post(url, set_body(30, steps=2), solo).data)
    long = json.loads(post(url, set_body(400, steps=2), solo).data)  # far longer than the test

    def done(job) -> int:
        answer = get(f"{url}/{job['id']}", solo)
        assert answer.status == 200, answer.data
        return json.loads(answer.data)["progress"]["done"]

    assert post(url, set_body(1), solo).status == 429  # solo's quota: two running jobs
    wait_for(lambda: done(short) > 0 and done(long) > 0, 60, "the first chunks")
    # the app goes away, and the long job's runner with it (as when a RayService upgrade replaces the cluster)
    serve.delete("emoji")
    owner = key_id(app, "solo")
    ray.kill(ray.get_actor(f"job:{owner}:{long['id']}", namespace=NAMESPACE), no_restart=True)
    before = read_state(job_folder(app["args"]["jobs_uri"], owner, long["id"]))["done"]
    deploy(app["model"], max_batch_size=2, same_serve=True, **app["args"])
    # the new ingress resumes it on its own, before anyone asks, after the last chunk it recorded
    wait_for(lambda: runner(owner, long["id"]) is not None, 30, "the ingress to resume the orphaned job")
    wait_for(lambda: done(long) > before, 60, "the resumed runner to go on")
    state = json.loads(get(f"{url}/{short['id']}", solo).data)
    assert state["state"] in ("running", "succeeded"), state
    assert finished(app, short["id"], "solo")["state"] == "succeeded"
    # cancel: the runner stops after its chunk, packages what it drew and marks it partial
    assert delete(f"{url}/{long['id']}", auth(app, "bob")).status == 404
    assert delete(f"{url}/{long['id']}", solo).status == 202
    state = finished(app, long["id"], "solo")
    assert state["state"] == "cancelled" and state["partial"] and 0 < state["progress"]["done"] < 400
    manifest = json.loads(get(f"{app['url']}{state['result']['manifest']}", solo).data)
    assert manifest["partial"] is True and len(manifest["items"]) == state["progress"]["done"]


def test_ten_concurrent_job_posts_with_room_for_one_start_exactly_one(app):
    """The quota is decided by one actor (serve/meter.py), not checked and then acted on by each request: the
    old check counted live runners, then started one, so ten concurrent posts with --max-jobs 1 all got 202."""
    import ray

    from emoji_ldm.serve.placement import NAMESPACE

    url, one = f"{app['url']}/v1/jobs", auth(app, "one")
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: post(url, set_body(200, steps=2), one), range(10)))
    codes = sorted(a.status for a in answers)
    assert codes == [202] + [429] * 9, [a.data for a in answers]
    refused = next(a for a in answers if a.status == 429)
    assert "'one' has 1 job(s) running" in json.loads(refused.data)["error"] and refused.headers["Retry-After"]
    prefix = f"job:{key_id(app, 'one')}:"
    runners = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)]
    assert len(runners) == 1, runners
    at_quota = post(url, {**set_body(1), "callback_url": "http://10.1.2.3/hook"}, one)
    assert at_quota.status == 429, at_quota.data  # the quota first: a key at it costs no callback lookup
    started = json.loads(next(a for a in answers if a.status == 202).data)
    assert delete(f"{url}/{started['id']}", one).status == 202
    assert finished(app, started["id"], "one")["state"] == "cancelled"
    wait_for(lambda: post(url, set_body(1), one).status == 202, 30, "room for the next job once it ended")


def test_revoking_a_key_cancels_its_running_job_and_sends_no_webhook(app):
    """The ingress's sweep (every sweep_s) cancels the jobs of a key revoked in the file; the runner stops after
    its chunk and its webhook is not sent: the revoked key's owner gets nothing more from the service."""
    from emoji_ldm.serve.jobs.store import REVOKED_ERROR, job_folder, read_state
    from emoji_ldm.serve.keys import KeysRevokeConfig, revoke_command

    receiver = Receiver()
    receiver.failures_left = 0
    try:
        url, gone = f"{app['url']}/v1/jobs", auth(app, "gone")
        answer = post(url, set_body(300, steps=2, callback_url=receiver.url), gone)
        assert answer.status == 202, answer.data
        job = json.loads(answer.data)
        wait_for(lambda: json.loads(get(f"{url}/{job['id']}", gone).data)["progress"]["done"] > 0, 60,
                 "the first chunk")
        revoke_command(KeysRevokeConfig(file=app["keyfile"], name="gone"))
        folder = job_folder(app["args"]["jobs_uri"], key_id(app, "gone"), job["id"])
        state = wait_for(lambda: (s := read_state(folder)) and s.get("callback") and s, 60,
                         "the job to end with its callback recorded")
        assert state["state"] == "cancelled" and state["done"] < 300, state
        assert REVOKED_ERROR in state["errors"]
        assert state["callback"]["delivered"] is False and state["callback"]["attempts"] == 0
        time.sleep(1)
        assert receiver.deliveries == []
        assert get(f"{url}/{job['id']}", gone).status == 401
    finally:
        receiver.server.shutdown()


def test_requests_are_metered_by_cost_before_any_model_work(app):
    """images x steps x (size/64)^2 per key, from one bucket for every replica: `thrifty` may spend 100 units a
    minute. A request of 16 x 100 is refused at once (more than a minute's budget), 1 x 60 passes, then 1 x 60
    is refused with Retry-After while 1 x 2 still fits; and one request may not ask for more pixels than the
    per-request budget."""
    url, thrifty = f"{app['url']}/v1/generate", auth(app, "thrifty")
    start = time.perf_counter()
    big = post(url, {"prompt": "x", "n": 16, "steps": 100}, thrifty)
    assert big.status == 429 and "costs 1600 units" in json.loads(big.data)["error"], big.data
    assert time.perf_counter() - start < 5  # refused before 1600 steps were drawn
    assert post(url, {"prompt": "x", "n": 1, "steps": 60}, thrifty).status == 200
    again = post(url, {"prompt": "x", "n": 1, "steps": 60}, thrifty)
    assert again.status == 429 and int(again.headers["Retry-After"]) >= 1, again.data
    assert post(url, {"prompt": "x", "n": 1, "steps": 2}, thrifty).status == 200
    sets = post(f"{app['url']}/v1/emoji-sets", {"theme": "t", "items": ["a", "b"], "steps": 50}, thrifty)
    assert sets.status == 429, sets.data  # a set costs its items x steps
    huge = post(url, {"prompt": "x", "n": 64, "steps": 1, "size": 512}, auth(app, "alice"))
    assert huge.status == 422 and json.loads(huge.data)["field"] == "size", huge.data


def test_a_route_prefix_does_not_open_the_api(app):
    """The issue's attack on a real Serve: an app deployed with route_prefix /emoji (Ray puts the prefix in
    root_path) refuses /emoji/v1/generate and every other non-public route without a key."""
    from ray import serve

    deploy(app["model"], max_batch_size=2, same_serve=True, name="prefixed", route_prefix="/emoji",
           keys=app["args"]["keys"])
    try:
        base = app["url"] + "/emoji"
        for method, path in (("POST", "/v1/generate"), ("GET", "/v1/model"), ("POST", "//v1/generate"),
                             ("POST", "/v1/generate/"), ("POST", "/%76%31/generate"), ("GET", "/openapi.json"),
                             ("GET", "/docs"), ("OPTIONS", "/v1/generate"), ("HEAD", "/v1/model")):
            answer = HTTP.request(method, base + path, body=b'{"prompt": "x", "steps": 1}',
                                  headers={"content-type": "application/json"})
            assert answer.status == 401, (method, path, answer.status, answer.data)
        assert json.loads(get(base + "/healthz").data) == {"status": "ok"}  # open, and no model URI
        ok = post(base + "/v1/generate", {"prompt": "x", "steps": 1}, auth(app, "alice"))
        assert ok.status == 200, ok.data
    finally:
        serve.delete("prefixed")


# --- webhook delivery to real servers on 127.0.0.1 (no Ray, no S3): serve/webhooks.py ------------------------
# The receivers listen on 127.0.0.1 and 127.0.0.2, reached through the allowlist; the resolver is injected, so a
# name can answer one address when it is checked and another after, and the pinned-address path runs.


class HookServer:
    """A webhook receiver on `host`: answers each POST with the next of `statuses` (the last one after that),
    and keeps what it got."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, statuses=(200,), tls: ssl.SSLContext | None = None,
                 body_bytes: int = 0):
        self.got: list[dict] = []
        self.sent = 0  # bytes of the answer's body the receiver got to send before the sender hung up
        self.answered = threading.Event()
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.got.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": data})
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", str(body_bytes))
                self.end_headers()
                chunk = b"x" * 65536
                try:
                    while receiver.sent < body_bytes:
                        self.wfile.write(chunk[:body_bytes - receiver.sent])
                        receiver.sent += min(len(chunk), body_bytes - receiver.sent)
                except OSError:
                    pass
                finally:
                    receiver.answered.set()

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks():
    made = []

    def make(*args, **kwargs) -> HookServer:
        made.append(HookServer(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_delivery_goes_to_the_checked_address_only(hooks):
    """The name resolves to 127.0.0.1 when the delivery checks it, and to 127.0.0.2 after: the retry after a
    500 still goes to 127.0.0.1 (pinned), with the name in the Host header; nothing reaches 127.0.0.2, and the
    name was resolved once."""
    first = hooks(statuses=(500, 200))
    second = hooks("127.0.0.2", first.port)
    answers = iter([["127.0.0.1"]])
    asked = []

    def rebinding(host, port):
        asked.append((host, port))
        return next(answers, ["127.0.0.2"])

    url = f"http://hooks.test:{first.port}/hook?job=1"
    outcome = deliver(url, {"id": "job-1"}, "s3cret", allow=["127.0.0.0/8"], resolve=rebinding,
                      sleep=lambda s: None)
    assert outcome["delivered"] is True and outcome["attempts"] == 2 and outcome["status"] == 200
    assert asked == [("hooks.test", first.port)]
    assert [g["path"] for g in first.got] == ["/hook?job=1"] * 2 and second.got == []
    got = first.got[-1]
    assert got["headers"]["host"] == f"hooks.test:{first.port}"
    assert verify_signature("s3cret", got["body"], got["headers"][TIMESTAMP_HEADER.lower()],
                            got["headers"][SIGNATURE_HEADER.lower()])


def test_a_name_public_at_post_time_and_private_at_delivery_gets_nothing(hooks):
    """Checked when the job is posted (127.0.0.1, allowed), resolved again when it ends (127.0.0.2, not
    allowed): the delivery is refused, and neither address gets a request."""
    first = hooks()
    second = hooks("127.0.0.2", first.port)
    answers = iter([["127.0.0.1"]])

    def rebinding(host, port):
        return next(answers, ["127.0.0.2"])

    url = f"http://hooks.test:{first.port}/hook"
    assert check_callback(url, allow=["127.0.0.1/32"], resolve=rebinding).addresses == ("127.0.0.1",)
    outcome = deliver(url, {"id": "job-1"}, "s3cret", allow=["127.0.0.1/32"], resolve=rebinding,
                      sleep=lambda s: None)
    assert outcome["delivered"] is False and outcome["attempts"] == 0
    assert outcome["error"] == f"{DELIVERY_FAILED}: {REFUSED_MESSAGE}" and "127.0.0.2" not in outcome["error"]
    assert first.got == [] and second.got == []


def test_a_4xx_answer_is_not_retried_and_is_reported_by_status(hooks):
    r = hooks(statuses=(403,))
    outcome = deliver(f"http://127.0.0.1:{r.port}/", {"id": "job-1"}, "s3cret", allow=["127.0.0.1/32"],
                      sleep=lambda s: None)
    assert (outcome["attempts"], outcome["status"], outcome["error"]) == (1, 403, f"{DELIVERY_FAILED}: HTTP 403")


def test_a_huge_answer_is_read_only_up_to_the_cap(hooks):
    """A 256 MiB answer: the sender reads 64 KiB and hangs up, so the receiver gets to send that and what the
    sockets' buffers hold, far from all of it."""
    r = hooks(body_bytes=256 << 20)
    started = time.monotonic()
    outcome = deliver(f"http://127.0.0.1:{r.port}/", {"id": "job-1"}, "s3cret", allow=["127.0.0.1/32"])
    assert outcome["delivered"] and time.monotonic() - started < 5
    assert r.answered.wait(5)
    assert MAX_RESPONSE_BYTES <= r.sent < 32 << 20, r.sent


def test_a_receiver_that_drips_its_answer_is_cut_at_the_deadline():
    """A receiver that sends one byte of its status line every 0.1 s, forever: every read returns within the
    socket timeout, so only the overall deadline ends the attempt."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def drip():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            while not stop.is_set():
                try:
                    conn.sendall(b"H")
                except OSError:
                    return
                time.sleep(0.1)

    threading.Thread(target=drip, daemon=True).start()
    started = time.monotonic()
    try:
        outcome = deliver(f"http://127.0.0.1:{server.getsockname()[1]}/", {"id": "job-1"}, "s3cret",
                          allow=["127.0.0.1/32"], attempts=1, deadline_s=1.0)
    finally:
        stop.set()
        server.close()
    assert time.monotonic() - started < 4
    assert outcome["delivered"] is False and outcome["error"] == DELIVERY_FAILED


# --- TLS: connect to the checked IP, verify the certificate against the name --------------------------------


def certificate(tmp_path, name: str) -> tuple[str, str]:
    """A self-signed certificate for `name` (and its key), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_delivery_connects_to_the_ip_with_the_name_as_sni_and_certificate_name(tmp_path, hooks):
    cert, key = certificate(tmp_path, "hooks.test")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    sni = []
    tls.sni_callback = lambda sock, name, ctx: sni.append(name)
    r = hooks(tls=tls)
    names = {"hooks.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    outcome = deliver(f"https://hooks.test:{r.port}/hook", {"id": "job-1"}, "s3cret", allow=["127.0.0.1/32"],
                      resolve=lambda host, port: names[host], ca_certs=cert)
    assert outcome["delivered"] is True, outcome
    assert sni == ["hooks.test"] and r.got[0]["headers"]["host"] == f"hooks.test:{r.port}"
    # the same server under another name: its certificate does not name it, so nothing is sent
    outcome = deliver(f"https://other.test:{r.port}/hook", {"id": "job-2"}, "s3cret", allow=["127.0.0.1/32"],
                      resolve=lambda host, port: names[host], ca_certs=cert, attempts=1)
    assert outcome["delivered"] is False and outcome["error"] == DELIVERY_FAILED and len(r.got) == 1


# --- Standard Webhooks, and a job's events filter ------------------------------------------------------------


class _Keeper:
    """A receiver on 127.0.0.1 that keeps each delivery's headers and raw body."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.got: list[tuple[dict, bytes]] = []
        keeper = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                keeper.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def keeper():
    made = _Keeper()
    yield made
    made.server.shutdown()


def test_a_delivery_verifies_with_the_standard_webhooks_reference_verifier(keeper):
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from emoji_ldm.serve.webhooks import EVENT_HEADER, standard_secret

    secret = "Zk3x_-Q9" * 5  # as `emoji-ldm keys create` makes them: URL-safe base64 characters
    payload = {"id": "job-20260101-000000-00000001", "state": "succeeded", "progress": {"done": 3, "total": 3}}
    outcome = deliver(keeper.url, payload, secret, allow=["127.0.0.1/32"], sleep=lambda s: None)
    assert outcome["delivered"], outcome
    headers, body = keeper.got[0]
    assert Webhook(standard_secret(secret)).verify(body, headers) == payload
    assert headers["webhook-id"] == f"{payload['id']}_completed" and headers[EVENT_HEADER.lower()] == "completed"
    assert verify_signature(secret, body, headers["x-emoji-ldm-timestamp"], headers["x-emoji-ldm-signature"])
    with pytest.raises(WebhookVerificationError):
        Webhook(standard_secret(secret)).verify(body.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(standard_secret("another secret")).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(standard_secret(secret)).verify(body, {**headers, "webhook-id": payload["id"] + "_failed"})


def _job_state(state: str, done: int) -> dict:
    return {"id": "job-1", "state": state, "done": done, "total": 4, "errors": []}


@pytest.mark.parametrize("events,expected", [
    (None, ["completed"]),
    (["started", "progress", "completed"], ["started", "progress", "progress", "completed"]),
    (["progress"], ["progress", "progress"]),
])
def test_a_jobs_events_filter_picks_its_deliveries_in_order(keeper, events, expected):
    from emoji_ldm.serve.jobs.hooks import JobHooks
    from emoji_ldm.serve.jobs.store import public_state

    hooks = JobHooks({"callback_url": keeper.url, "callback_events": events}, "s3cret", ("127.0.0.1/32",))
    for kind, state, done in (("queued", "queued", 0), ("started", "running", 0), ("progress", "running", 2),
                              ("progress", "running", 4)):
        hooks.event(kind, _job_state(state, done), public_state)
    outcome = hooks.final(public_state(_job_state("succeeded", 4)))
    assert (outcome is not None and outcome["delivered"]) == ("completed" in expected)
    assert [h["x-emoji-ldm-event"] for h, _ in keeper.got] == expected
    ids = [h["webhook-id"] for h, _ in keeper.got]
    assert len(set(ids)) == len(ids)  # one id per delivery; a retry of one keeps its id
