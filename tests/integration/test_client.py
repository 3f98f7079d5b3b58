"""emoji_ldm.client against real servers on 127.0.0.1: a scripted stand-in for the protocol's hard cases (a POST
whose answer is lost, a 429 with Retry-After, a 400, an event stream that drops mid-message and resumes with
Last-Event-ID), then the real service (Serve, a tiny model, API keys, durable jobs on local disk): the README's
three lines, events by polling, idempotency, errors, cancel, generate, verify and the async twins."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from emoji_ldm.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    JobCancelled,
    NotFoundError,
    ValidationError,
)

ROOT = Path(__file__).resolve().parents[2]
JOB = {"id": "job-20260101-000000-00000001", "state": "queued", "progress": {"done": 0, "total": 4}}


class Scripted:
    """An HTTP/1.1 server that answers each (method, path) from a list of actions, one per request (the last
    repeats), and records every request's headers. An action: a (status, body, headers) answer, "drop" (close
    without answering), or a callable(handler) that writes the answer itself."""

    def __init__(self, script: dict):
        self.script, self.seen = script, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                owner.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                actions = owner.script[(self.command, self.path)]
                action = actions.pop(0) if len(actions) > 1 else actions[0]
                if action == "drop":
                    self.close_connection = True
                    return
                if callable(action):
                    return action(self)
                status, body, headers = action
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                    **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def keys(self, method: str, path: str) -> list:
        return [h.get("idempotency-key") for m, p, h in self.seen if (m, p) == (method, path)]


@pytest.fixture
def scripted():
    made = []

    def make(script: dict) -> Scripted:
        made.append(Scripted(script))
        return made[-1]

    yield make
    for server in made:
        server.server.shutdown()
        server.server.server_close()


def quick(url: str, **kwargs) -> tuple[Client, list]:
    retries = []
    return Client(url, retries=3, backoff_s=0.01, on_retry=retries.append, **kwargs), retries


def test_a_retried_submit_sends_the_same_idempotency_key_and_makes_one_job(scripted):
    server = scripted({("POST", "/v1/jobs"): ["drop", (503, {"error": "at capacity", "field": None}, {}),
                                              (202, JOB, {})]})
    client, retries = quick(server.url)
    job = client.submit({"theme": "blob", "items": ["a"]})
    keys = server.keys("POST", "/v1/jobs")
    assert job.id == JOB["id"] and len(keys) == 3 and len(set(keys)) == 1 and re.fullmatch(r"[0-9a-f-]{36}", keys[0])
    assert [r.status for r in retries] == [None, 503]
    client.submit({"theme": "blob", "items": ["a"]})
    assert server.keys("POST", "/v1/jobs")[3] != keys[0]  # a new submit is a new job


def test_a_429_waits_its_retry_after_and_a_400_is_not_retried(scripted):
    server = scripted({("POST", "/v1/jobs"): [(429, {"error": "key 'k' is over its rate", "field": None},
                                               {"Retry-After": "1"}), (202, JOB, {})],
                       ("GET", f"/v1/jobs/{JOB['id']}"): [(400, {"error": "malformed", "field": None}, {})]})
    client, retries = quick(server.url)
    client.submit({"theme": "blob", "items": ["a"]})
    assert [(r.status, r.wait_s, r.reason) for r in retries] == [(429, 1.0, "key 'k' is over its rate")]
    with pytest.raises(BadRequestError) as refused:
        client.status(JOB["id"])
    assert refused.value.status == 400 and refused.value.message == "malformed"
    assert len(server.keys("GET", f"/v1/jobs/{JOB['id']}")) == 1 and len(retries) == 1


def test_a_retry_after_longer_than_the_client_waits_raises_at_once(scripted):
    server = scripted({("POST", "/v1/jobs"): [(429, {"error": "budget spent", "field": None},
                                               {"Retry-After": "3600"})]})
    client, retries = quick(server.url)
    with pytest.raises(Exception) as limited:
        client.submit({"theme": "blob", "items": ["a"]})
    assert limited.value.retry_after == 3600 and retries == []


EVENTS = [("queued", {"position": 2}), ("started", {}), *[("progress", {"done": k, "total": 4}) for k in (1, 2, 3, 4)],
          ("completed", {"progress": {"done": 4, "total": 4}})]


def event_stream(cuts: list[tuple[int, str]], chunked: bool = True):
    """The events route: from after Last-Event-ID (or the start) until the next cut (an index in EVENTS and how
    the connection ends there: "mid-message" cut inside it, "eof" closed cleanly before it), chunked or ended
    by closing the connection."""

    def answer(handler):
        after = int(handler.headers.get("Last-Event-ID") or 0)
        stop, how = cuts.pop(0) if cuts else (len(EVENTS), "eof")
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
        handler.end_headers()

        def chunk(data: bytes):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            handler.wfile.flush()

        chunk(b"retry: 10\n: connected\n\n")
        for n in range(after + 1, stop + 1):
            kind, data = EVENTS[n - 1]
            chunk(f"id: {n}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        if how == "mid-message":
            kind, data = EVENTS[stop]
            chunk(f"id: {stop + 1}\nevent: {kind}\ndata: {json.dumps(data)}\n".encode())  # no blank line: cut
        elif chunked:
            handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True

    return answer


@pytest.mark.parametrize("chunked", [True, False])
def test_a_stream_that_drops_resumes_with_last_event_id_and_misses_and_repeats_nothing(scripted, chunked):
    path = f"/v1/jobs/{JOB['id']}/events"
    server = scripted({("GET", path): [event_stream([(3, "mid-message"), (5, "eof")], chunked)]})
    client, retries = quick(server.url)
    events = list(client.subscribe(JOB["id"]))
    assert [(e.id, e.type, e.done) for e in events] == [(str(n), kind, data.get("done", data.get("progress", {})
                                                                                     .get("done")))
                                                        for n, (kind, data) in enumerate(EVENTS, 1)]
    assert [h.get("last-event-id") for m, p, h in server.seen if p == path] == [None, "3", "5"]
    assert [r.wait_s for r in retries] == [0.01, 0.01] and events[0].data == {"position": 2}


def test_a_stream_that_goes_away_is_followed_by_polling_from_where_it_was(scripted):
    job = f"/v1/jobs/{JOB['id']}"
    running, ended = ({**JOB, "state": state, "progress": {"done": done, "total": 4}, "started_at": "t"}
                      for state, done in (("running", 2), ("succeeded", 4)))
    server = scripted({("GET", f"{job}/events"): [event_stream([(3, "mid-message")]),
                                                  (404, {"error": "Not Found", "field": None}, {})],
                       ("GET", job): [(200, running, {}), (200, ended, {})]})
    client, _ = quick(server.url, poll_s=0.01)
    events = [(e.type, e.done) for e in client.subscribe(JOB["id"])]
    assert events == [("queued", None), ("started", None), ("progress", 1), ("progress", 2), ("progress", 3),
                      ("progress", 4), ("completed", 4)]


def test_verify_sends_the_file_to_the_service_when_asked(scripted, tmp_path):
    report = {"file": "a.gif", "signed": True, "valid": True, "status": ["signingCredential.untrusted"]}
    server = scripted({("POST", "/v1/verify"): [(200, report, {})]})
    (tmp_path / "a.gif").write_bytes(b"GIF89a not really")
    client, _ = quick(server.url)
    assert client.verify(tmp_path / "a.gif", remote=True) == report
    assert server.seen[0][2]["content-type"] == "image/gif" and server.seen[0][2]["content-length"] == "17"


def test_a_stream_that_never_comes_back_is_an_error_after_the_retries(scripted):
    server = scripted({("GET", f"/v1/jobs/{JOB['id']}/events"): [event_stream([(1, "eof")] * 10)]})
    client, _ = quick(server.url)
    with pytest.raises(Exception, match="dropped 4 times in a row"):
        list(client.subscribe(JOB["id"]))


# --- the real service -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from ray import serve

    from emoji_ldm.serve.keys import KeysCreateConfig, create_command
    from tests.serving import deploy, stop_runners
    from tests.tiny_models import tiny_model_with_card

    root = tmp_path_factory.mktemp("client")
    model = str(tiny_model_with_card(root / "model"))
    keyfile = str(root / "keys.json")
    key = create_command(KeysCreateConfig(file=keyfile, name="client", rate=6000, max_jobs=8)).splitlines()[2]
    url = deploy(model, max_batch_size=2, keys=keyfile, jobs_uri=str(root / "jobs"), job_num_cpus=0.5, sweep_s=1.0)
    yield {"url": url, "key": key}
    serve.shutdown()
    stop_runners()


def three_lines(doc: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
    found = [b for b in blocks if b.startswith("from emoji_ldm.client import Client\n")]
    assert found, f"{doc} shows no example that starts `from emoji_ldm.client import Client`"
    return found[0]


def test_the_three_line_example_of_the_readme_runs(service, tmp_path, monkeypatch):
    doc, code = "README.md", three_lines("README.md")
    assert code == three_lines("docs/client.md") and len(code.splitlines()) == 3 and "http://127.0.0.1:8000" in code
    monkeypatch.setenv("EMOJI_LDM_API_KEY", service["key"])
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:8000", service["url"]), doc, "exec"), {})
    assert [i["item"] for i in manifest_of(tmp_path / "set.zip")["items"]] == ["happy", "sad", "thinking"]


def manifest_of(path: Path) -> dict:
    """The manifest.json of a job's zip (its files are under a folder named for the job)."""
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(next(n for n in z.namelist() if n.endswith("/manifest.json"))))


def client_of(service, **kwargs) -> Client:
    return Client(service["url"], service["key"], poll_s=0.2, max_poll_s=1.0, **kwargs)


def test_subscribe_polls_a_job_to_its_end_one_progress_event_per_emoji(service):
    client = client_of(service)
    events = list(client.subscribe({"theme": "blob", "items": ["a", "b", "c", "d", "e"], "steps": 2}))
    assert [e.type for e in events] == ["queued", "started", *["progress"] * 5, "completed"]
    assert [e.done for e in events if e.type == "progress"] == [1, 2, 3, 4, 5]
    assert zipfile.ZipFile(io.BytesIO(client.result(events[0].job_id))).testzip() is None


def test_submit_is_idempotent_by_its_key_and_a_reused_key_with_another_body_is_a_409(service):
    client = client_of(service)
    first = client.submit({"theme": "blob", "items": ["a"], "steps": 2}, idempotency_key="client-order-1")
    again = client.submit({"theme": "blob", "items": ["a"], "steps": 2}, idempotency_key="client-order-1")
    assert again.id == first.id
    with pytest.raises(ConflictError, match="Idempotency-Key was used with a different body") as conflict:
        client.submit({"theme": "blob", "items": ["b"], "steps": 2}, idempotency_key="client-order-1")
    assert conflict.value.status == 409
    first.wait(timeout=300)


def test_the_service_errors_are_raised_with_its_message(service):
    client = client_of(service)
    with pytest.raises(ValidationError) as bad:
        client.submit({"theme": "blob", "items": ["a"], "steps": 2, "size": 30})
    assert bad.value.status == 422 and bad.value.field == "size"
    with pytest.raises(NotFoundError, match="no job 'job-20260101-000000-0000000f' for this key"):
        client.status("job-20260101-000000-0000000f")
    with pytest.raises(AuthenticationError) as refused:
        Client(service["url"], "eml_not-a-key").submit({"theme": "blob", "items": ["a"]})
    assert refused.value.status == 401 and refused.value.message


def test_cancel_ends_the_stream_cancelled_and_keeps_the_partial_set(service, tmp_path):
    client = client_of(service)
    job = client.submit({"theme": "blob", "items": [f"item {i}" for i in range(60)], "steps": 2})
    events = []
    for event in job.events(timeout=300):
        events.append(event)
        if event.type == "progress" and event.done == 1:
            client.cancel(job)
    assert events[-1].type == "cancelled" and events[-1].done < 60
    with pytest.raises(JobCancelled, match=f"job {job.id} was cancelled after"):
        job.wait()
    saved = job.save(tmp_path / "partial.zip")
    assert manifest_of(saved)["partial"] is True
    reports = client.verify(saved)  # each image of the set, by its name in the zip
    assert reports and all(name.endswith(".png") and not r["signed"] for name, r in reports.items())


def test_generate_and_verify(service, tmp_path):
    client = client_of(service)
    made = client.generate("smiling cat face", n=2, steps=2, seed=7)
    assert made.seeds == [7, 8] and all(image.startswith(b"\x89PNG") for image in made.images)
    first = made.save(tmp_path)[0]
    assert first.name == "emoji-7.png"
    report = client.verify(first)  # c2pa is installed: verified here; this server signs nothing
    assert report["signed"] is False and report["file"] == "emoji-7.png"
    remote = client.verify(first, remote=True)  # the service's POST /v1/verify gives the same verdict
    assert remote["signed"] is False


def test_the_async_client_does_the_same(service):
    async def run():
        client = AsyncClient(service["url"], service["key"], poll_s=0.2, max_poll_s=1.0)
        job = await client.submit({"theme": "blob", "items": ["a", "b"], "steps": 2})
        kinds = [event.type async for event in client.subscribe(job)]
        data = await client.result(job)
        return kinds, data, (await client.generate("heart", steps=2)).images

    kinds, data, images = asyncio.run(run())
    assert kinds == ["queued", "started", "progress", "progress", "completed"]
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None and len(images) == 1
