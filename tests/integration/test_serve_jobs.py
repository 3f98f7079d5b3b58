"""Durable jobs over HTTP on real servers: the Serve app with API keys, job state in moto S3, a webhook
receiver on 127.0.0.1 that verifies signatures. Keys, quotas, idempotency, SSRF, a Serve restart, cancel."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.serving import HTTP, deploy, get, post, wait_for
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


def make_keys(path: str) -> dict[str, tuple[str, str]]:
    """name -> (key, webhook secret), made as `emoji-ldm keys create` makes them."""
    from emoji_ldm.serve.keys import KeysCreateConfig, create_command

    made = {}
    for name, flags in (("alice", {"max_jobs": 4}), ("bob", {}), ("solo", {"max_jobs": 2}), ("slow", {"rate": 2})):
        lines = create_command(KeysCreateConfig(file=path, name=name, **flags)).splitlines()
        made[name] = (lines[2], lines[4])
    return made


@pytest.fixture(scope="module")
def app(s3_server, ray_local, tmp_path_factory):
    from ray import serve

    s3_server.client().create_bucket(Bucket="jobs")
    root = tmp_path_factory.mktemp("jobs")
    model = str(tiny_model_with_card(root / "model"))
    keys = make_keys(str(root / "keys.json"))
    args = {"keys": str(root / "keys.json"), "jobs_uri": "s3://jobs/emoji", "job_num_cpus": 0.5,
            "webhook_allow": ["127.0.0.1/32"]}
    url = deploy(model, max_batch_size=2, **args)
    receiver = Receiver()
    yield {"url": url, "model": model, "keys": keys, "args": args, "receiver": receiver}
    receiver.server.shutdown()
    serve.shutdown()
    stop_runners()


def stop_runners() -> None:
    import ray

    from emoji_ldm.serve.durable import NAMESPACE

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE:
            ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE))


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
    codes = [post(url, {"items": []}, auth(app, "slow")).status for _ in range(4)]
    assert codes[:2] == [422, 422] and codes[2:] == [429, 429]  # rate 2/min: the 3rd is over, the body unread
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
    assert state["result"]["uri"].startswith("s3://jobs/emoji/alice/")
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
    after = json.loads(get(f"{app['url']}/v1/jobs/{job['id']}", auth(app, "alice")).data)
    assert after["callback"]["delivered"] and after["callback"]["attempts"] == 2


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
                                      "http://[::1]:9/hook", "ftp://127.0.0.1/x", "http://user:pw@127.0.0.1/x"])
def test_callbacks_to_internal_addresses_are_refused(app, callback):
    answer = post(f"{app['url']}/v1/jobs", set_body(1, callback_url=callback), auth(app, "alice"))
    assert answer.status == 400 and json.loads(answer.data)["field"] == "callback_url", answer.data


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
    s3_server.client().put_object(Bucket="jobs", Key=f"emoji/bob/{job_id}/state.json", Body=b"{not json")
    answer = get(f"{app['url']}/v1/jobs/{job_id}", auth(app, "bob"))
    assert answer.status == 500 and "JSONDecodeError" in json.loads(answer.data)["error"], answer.data


def test_a_job_outlives_a_serve_restart_and_cancel_marks_partial_output(app):
    """Two jobs: one keeps running while the app is deleted and deployed again, and finishes; the other's runner
    is killed meanwhile, and the new ingress resumes it; the key's quota of two holds; the resumed one is
    cancelled: its zip says partial."""
    import ray
    from ray import serve

    from emoji_ldm.serve.durable import NAMESPACE, job_folder, read_state, runner

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
    ray.kill(ray.get_actor(f"job:solo:{long['id']}", namespace=NAMESPACE), no_restart=True)
    before = read_state(job_folder(app["args"]["jobs_uri"], "solo", long["id"]))["done"]
    deploy(app["model"], max_batch_size=2, same_serve=True, **app["args"])
    # the new ingress resumes it on its own, before anyone asks, after the last chunk it recorded
    wait_for(lambda: runner("solo", long["id"]) is not None, 30, "the ingress to resume the orphaned job")
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
