"""GET /v1/jobs/{id}/events on the real service (Serve with API keys, two ingress replicas, job state in moto S3,
the module fixtures of test_serve_jobs.py): a subscriber that disconnects mid-job and reconnects with
Last-Event-ID misses no event and sees none twice; the key rules of GET; emoji_ldm.client's subscribe over SSE."""

from __future__ import annotations

import json

import pytest

from emoji_ldm.client.events import SseParser
from tests.integration.test_serve_jobs import app, auth, set_body  # noqa: F401 - module fixture
from tests.serving import HTTP, get, post

pytestmark = pytest.mark.s3


def _open(app, job_id: str, name: str = "alice", last_id: str | None = None):  # noqa: F811 - the fixture's name
    headers = {**auth(app, name), "accept": "text/event-stream", **({"last-event-id": last_id} if last_id else {})}
    return HTTP.request("GET", f"{app['url']}/v1/jobs/{job_id}/events", headers=headers, preload_content=False)


def _read(answer, until) -> tuple[list, str | None]:
    """Messages until `until(message)` is true or the stream ends; then the connection is dropped."""
    parser, got = SseParser(), []
    try:
        for chunk in answer.stream(1024):
            for message in parser.feed(chunk):
                got.append(message)
                if until(message):
                    return got, parser.last_id
    finally:
        answer.close()  # the subscriber goes away: the connection is dropped, not returned to the pool
    return got, parser.last_id


def test_a_reconnect_with_last_event_id_misses_nothing_and_repeats_nothing(app):  # noqa: F811
    job = post(f"{app['url']}/v1/jobs", set_body(8), auth(app, "alice"))
    assert job.status == 202, job.data
    job_id = job.json()["id"]
    first = _open(app, job_id)
    assert first.status == 200 and first.headers["content-type"].startswith("text/event-stream")
    # dropped after the first progress event (or the end, if the job was quicker than the stream)
    before, last_id = _read(first, lambda m: m.event in ("progress", "completed", "failed", "cancelled"))
    assert before[0].event == "queued" and last_id == before[-1].id
    after, _ = _read(_open(app, job_id, last_id=last_id), lambda m: m.event in ("completed", "failed"))
    messages = before + after
    ids = [int(m.id) for m in messages]
    assert ids == sorted(set(ids)), ids  # increasing: none twice
    kinds = [m.event for m in messages]
    assert kinds == ["queued", "started", *["progress"] * 8, "completed"], kinds
    assert [json.loads(m.data)["done"] for m in messages if m.event == "progress"] == list(range(1, 9))
    done = json.loads(messages[-1].data)
    assert done["state"] == "succeeded" and done["progress"] == {"done": 8, "total": 8}
    # the whole story again from any replica, and nothing after the end
    again, _ = _read(_open(app, job_id), lambda m: m.event == "completed")
    assert [(m.id, m.event) for m in again] == [(m.id, m.event) for m in messages]
    tail, _ = _read(_open(app, job_id, last_id=messages[-1].id), lambda m: True)
    assert tail == []


def test_the_events_of_another_keys_job_are_a_404(app):  # noqa: F811
    job_id = post(f"{app['url']}/v1/jobs", set_body(1), auth(app, "alice")).json()["id"]
    other = _open(app, job_id, "bob")
    assert other.status == 404 and json.loads(other.read())["error"].startswith("no job")
    bad = _open(app, job_id, last_id="progress-3")
    assert bad.status == 400 and json.loads(bad.read())["field"] == "Last-Event-ID"
    anonymous = HTTP.request("GET", f"{app['url']}/v1/jobs/{job_id}/events")
    assert anonymous.status == 401
    assert get(f"{app['url']}/v1/jobs/{job_id}", auth(app, "alice")).status == 200


def test_the_clients_subscribe_reads_the_stream(app):  # noqa: F811
    from emoji_ldm.client import Client

    client = Client(app["url"], app["keys"]["alice"][0])
    events = list(client.subscribe(set_body(3), timeout=300))
    assert [e.type for e in events] == ["queued", "started", "progress", "progress", "progress", "completed"]
    assert all(e.id and e.id.isdigit() for e in events)  # the stream's ids (polling makes "progress-1", ...)
    assert [e.done for e in events if e.type == "progress"] == [1, 2, 3] and events[-1].total == 3
