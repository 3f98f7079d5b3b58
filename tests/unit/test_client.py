"""The client's logic without a server: the event-stream parser, events from polled statuses, Retry-After, the
errors an answer becomes, and the settings' checks. The retries, the idempotency key and a stream that drops and
resumes run against real local servers in tests/integration/test_client.py (a unit test may not listen)."""

from __future__ import annotations

import email.utils

import pytest

from emoji_ldm.client import (
    AuthenticationError,
    Client,
    EmojiLdmError,
    RateLimitError,
    ServerError,
    ValidationError,
)
from emoji_ldm.client.errors import error_for, retry_after_s
from emoji_ldm.client.events import Seen, SseParser, event_from_sse
from emoji_ldm.errors import UserError

STREAM = (b"\xef\xbb\xbf: keep-alive\r\n"
          b"retry: 1500\n"
          b"id: 1\nevent: queued\ndata: {\"position\": 3}\n\n"
          b"id: 2\r\nevent: progress\r\ndata: {\"progress\": {\"done\": 1,\r\ndata:  \"total\": 2}}\r\n\r\n"
          b"id: 3\revent: completed\rdata: done\r\r\n")


def parse(chunks) -> tuple[list, SseParser]:
    parser = SseParser()
    return [m for chunk in chunks for m in parser.feed(chunk)], parser


def test_an_event_stream_parses_the_same_however_it_is_split():
    whole, parser = parse([STREAM])
    assert [(m.id, m.event) for m in whole] == [("1", "queued"), ("2", "progress"), ("3", "completed")]
    assert whole[1].data == '{"progress": {"done": 1,\n "total": 2}}' and whole[2].data == "done"
    assert parser.retry_s == 1.5 and parser.last_id == "3"
    for size in (1, 2, 3, 7):  # CRLF, the BOM and field names cut anywhere
        assert parse([STREAM[i:i + size] for i in range(0, len(STREAM), size)])[0] == whole


def test_a_message_cut_before_its_blank_line_is_not_given_and_not_resumed_after():
    messages, parser = parse([b"id: 1\ndata: a\n\n", b"id: 2\ndata: b\n"])
    assert [m.data for m in messages] == ["a"] and parser.last_id == "1"


def test_an_id_alone_moves_the_resume_point_and_a_nul_id_is_ignored():
    messages, parser = parse([b"id: 7\n\n"])
    assert messages == [] and parser.last_id == "7"
    parse_more = parser.feed(b"id: x\x00y\ndata: z\n\n")
    assert parse_more[0].id == "7" and parser.last_id == "7"


def test_stream_messages_become_events_with_their_progress():
    messages, _ = parse([STREAM])
    queued, progress, completed = (event_from_sse("job-1", m) for m in messages)
    assert queued.type == "queued" and queued.data == {"position": 3} and queued.done is None
    assert (progress.done, progress.total, progress.id) == (1, 2, "2")
    assert completed.terminal and completed.data == {"data": "done"}


def status(state: str, done: int, total: int = 5, started: bool = True) -> dict:
    return {"id": "job-1", "state": state, "progress": {"done": done, "total": total},
            "started_at": "t" if started and state != "queued" else None}


def test_polled_statuses_give_one_progress_event_per_finished_emoji_and_nothing_twice():
    seen = Seen("job-1")
    events = [e for s in (status("queued", 0), status("running", 2), status("running", 2), status("succeeded", 5))
              for e in seen.from_status(s)]
    assert [(e.type, e.done) for e in events] == [("queued", 0), ("started", 0), ("progress", 1), ("progress", 2),
                                                  ("progress", 3), ("progress", 4), ("progress", 5),
                                                  ("completed", 5)]
    assert len({e.id for e in events}) == len(events)


def test_a_job_first_seen_ended_still_tells_its_whole_story():
    assert [e.type for e in Seen("job-1").from_status(status("succeeded", 2, 2))] == [
        "queued", "started", "progress", "progress", "completed"]
    assert [e.type for e in Seen("job-1").from_status(status("failed", 0, 2, started=False))] == ["queued", "failed"]
    assert [e.type for e in Seen("job-1").from_status(status("cancelled", 1, 4))] == [
        "queued", "started", "progress", "cancelled"]


def test_polling_after_a_stream_goes_on_from_what_the_stream_said():
    seen = Seen("job-1")
    for message in parse([b"event: queued\ndata: {}\n\nevent: started\ndata: {}\n\n"
                          b"event: progress\ndata: {\"done\": 2, \"total\": 5}\n\n"])[0]:
        seen.note(event_from_sse("job-1", message))
    assert [(e.type, e.done) for e in seen.from_status(status("running", 3))] == [("progress", 3)]


def test_retry_after_takes_seconds_or_a_date_and_ignores_anything_else():
    assert retry_after_s("3") == 3.0 and retry_after_s(" 0 ") == 0.0 and retry_after_s("-4") == 0.0
    assert retry_after_s(email.utils.formatdate(1_000_030, usegmt=True), now=1_000_000) == 30.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None and retry_after_s("") is None


def test_an_error_answer_becomes_its_class_with_the_service_message():
    e = error_for(422, b'{"error": "steps: must be at least 1", "field": "steps", "errors": []}')
    assert isinstance(e, ValidationError) and (e.status, e.field, e.message) == (422, "steps",
                                                                               "steps: must be at least 1")
    limited = error_for(429, b'{"error": "spent", "field": null, "cost_units": 6}', {"Retry-After": "7"})
    assert isinstance(limited, RateLimitError) and limited.retry_after == 7.0 and limited.body["cost_units"] == 6
    proxy = error_for(502, b"<html>Bad gateway</html>")
    assert isinstance(proxy, ServerError) and proxy.message == "<html>Bad gateway</html>"
    assert isinstance(error_for(401, b'{"error": "no key"}'), AuthenticationError)
    odd = error_for(418, b"")
    assert type(odd) is EmojiLdmError and odd.message == "HTTP 418" and "418" in str(odd)


@pytest.mark.parametrize(("kwargs", "named"), [({"base_url": "127.0.0.1:8000"}, "base_url '127.0.0.1:8000'"),
                                               ({"retries": -1}, "retries -1"), ({"timeout": 0}, "timeout 0"),
                                               ({"api_key": "eml_abc\n"}, "api_key")])
def test_bad_settings_are_refused_naming_the_value(kwargs, named):
    with pytest.raises(UserError, match=named):
        Client(**{"base_url": "http://127.0.0.1:8000", **kwargs})


def test_the_key_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.setenv("EMOJI_LDM_API_KEY", "eml_from-env")
    assert Client("http://h").transport.headers["Authorization"] == "Bearer eml_from-env"
    assert Client("http://h", api_key="eml_given").transport.headers["Authorization"] == "Bearer eml_given"
    monkeypatch.delenv("EMOJI_LDM_API_KEY")
    assert "Authorization" not in Client("http://h").transport.headers


def test_a_job_is_named_by_a_job_or_its_id():
    with pytest.raises(UserError, match="neither a Job nor a job id"):
        Client("http://h").subscribe(None)
    with pytest.raises(UserError, match="spec must be a dict"):
        Client("http://h").submit("blob hearts")


def test_a_remote_verify_sends_the_files_sidecar(tmp_path):
    """A file whose manifest did not fit its cap has a `.c2pa` sidecar beside it: the service's /v1/verify gets it
    as `X-C2PA-Sidecar` (base64), as it does for a set's zip member."""
    import base64
    import json
    from types import SimpleNamespace

    from emoji_ldm.client.verify import verify

    (tmp_path / "a.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "a.c2pa").write_bytes(b"manifest store")
    sent = []

    def request(method, path, body=None, headers=None, **kwargs):
        sent.append((method, path, headers))
        return SimpleNamespace(data=json.dumps({"signed": True}).encode())

    assert verify(SimpleNamespace(request=request), tmp_path / "a.png", remote=True) == {"signed": True}
    assert sent[0][:2] == ("POST", "/v1/verify")
    assert base64.b64decode(sent[0][2]["X-C2PA-Sidecar"]) == b"manifest store"
    assert sent[0][2]["Content-Type"] == "image/png"
