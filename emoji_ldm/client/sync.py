"""`Client`: submit a job, follow its events, fetch its result, cancel it, verify a file, generate one-shot.

A job's events come from `GET /v1/jobs/{id}/events` (server-sent events, resumed with `Last-Event-ID` after a
drop) when the service has that route, else from polling `GET /v1/jobs/{id}` with backoff; the iterator is
the same either way (events.py)."""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

from urllib3.exceptions import HTTPError, ReadTimeoutError

from emoji_ldm.client.errors import ConnectError, EmojiLdmError, JobCancelled, JobFailed
from emoji_ldm.client.events import Event, Seen, SseParser, event_from_sse
from emoji_ldm.client.transport import Retry, Settings, Transport, close_stream
from emoji_ldm.errors import UserError

NO_STREAM = (404, 405, 406, 501)  # a service without the events route: poll instead
CLEAN_CLOSE_S = 5.0  # a stream the service closed after this long ended as planned (it ends each after minutes)


class Job:
    """A job on the service: `id`, its last fetched `status` (the JSON of GET /v1/jobs/{id}), and shortcuts to
    the client's calls: `job.wait().save("set.zip")`."""

    def __init__(self, client: Client, status: dict):
        self.client, self.status = client, status

    def __repr__(self) -> str:
        return f"Job({self.id!r}, state={self.state!r})"

    @property
    def id(self) -> str:
        return self.status["id"]

    @property
    def state(self) -> str:
        return self.status["state"]

    def refresh(self) -> Job:
        self.status = self.client.status(self.id)
        return self

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        return self.client.subscribe(self, timeout=timeout)

    def wait(self, timeout: float | None = None) -> Job:
        """Until the job ends (TimeoutError after `timeout` s); `JobFailed` if it failed, `JobCancelled` if it was
        cancelled (its partial result can still be saved)."""
        for _ in self.events(timeout):
            pass
        self.refresh()
        if self.state == "failed":
            raise JobFailed(f"job {self.id} failed: {_reasons(self.status)}", self.status)
        if self.state == "cancelled":
            raise JobCancelled(f"job {self.id} was cancelled after {self.status['progress']['done']} of "
                               f"{self.status['progress']['total']} images", self.status)
        return self

    def result(self) -> bytes:
        return self.client.result(self)

    def save(self, path: str | os.PathLike) -> Path:
        return self.client.result(self, path)

    def manifest(self) -> dict:
        return self.client.transport.json("GET", f"/v1/jobs/{self.id}/manifest.json")

    def cancel(self) -> Job:
        return self.client.cancel(self)


class Client:
    """The service at `base_url`, with `api_key` (default: $EMOJI_LDM_API_KEY; none for a keyless local
    server). `timeout`: seconds to connect and between bytes; `retries`: tries after the first (transport.py
    says which failures are retried); `on_retry`: called with a `Retry` before each wait. Further settings
    (`poll_s`, `sse`, ...) are `Settings`' fields."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 4, *,
                 on_retry: Callable[[Retry], None] | None = None, **settings):
        self.settings = Settings(base_url, api_key, timeout, retries, **settings)
        self.transport = Transport(self.settings, on_retry)

    def submit(self, spec: dict, idempotency_key: str | None = None, cancel_after: str | float | None = None) -> Job:
        """Start a job (a set: `theme` + `items`; a bulk spec: `prompts`; the fields of POST /v1/jobs, `priority`
        among them). One Idempotency-Key (yours, or a fresh uuid4) for every try, so a retried submit never makes
        two jobs. `cancel_after`: seconds or a duration ("5m"): the service cancels the job at that deadline."""
        if not isinstance(spec, dict):
            raise UserError(f"spec must be a dict of POST /v1/jobs fields, e.g. {{'theme': 'blob', 'items': "
                            f"['happy', 'sad']}}; got {type(spec).__name__}")
        key = idempotency_key or str(uuid.uuid4())
        headers = {"Idempotency-Key": key, **({"Cancel-After": str(cancel_after)} if cancel_after else {})}
        status = self.transport.json("POST", "/v1/jobs", body=spec, headers=headers)
        return Job(self, status)

    def job(self, job_id: str) -> Job:
        """A job submitted earlier (by id), with its status now."""
        return Job(self, self.status(job_id))

    def status(self, job: Job | str) -> dict:
        return self.transport.json("GET", f"/v1/jobs/{_id(job)}")

    def cancel(self, job: Job | str) -> Job:
        """Ask the service to stop the job after its current chunk; what it drew is kept as a partial result."""
        status = self.transport.json("DELETE", f"/v1/jobs/{_id(job)}")
        if isinstance(job, Job):
            job.status = status
            return job
        return Job(self, status)

    def subscribe(self, job: Job | str | dict, timeout: float | None = None) -> Iterator[Event]:
        """The job's events until it ends (a spec is submitted first): queued, started, one progress per finished
        emoji, then completed, failed or cancelled. TimeoutError after `timeout` s."""
        if isinstance(job, dict):
            job = self.submit(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._events(_id(job), deadline)

    def _events(self, job_id: str, deadline: float | None) -> Iterator[Event]:
        seen = Seen(job_id)
        if self.settings.sse and (yield from self._stream(job_id, seen, deadline)):
            return
        yield from self._poll(job_id, seen, deadline)

    def _stream(self, job_id: str, seen: Seen, deadline: float | None) -> Iterator[Event]:
        """Events from the SSE route, reconnecting with Last-Event-ID; returns True at the job's end, False
        when the service has no such route (the caller polls from where the stream left off)."""
        last_id, failures, retry_s = None, 0, None
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
            try:
                answer = self.transport.request("GET", f"/v1/jobs/{job_id}/events", headers=headers, stream=True,
                                                read_timeout=_left(deadline, self.settings.timeout))
            except EmojiLdmError as e:
                if e.status in NO_STREAM:
                    return False
                raise
            if not answer.headers.get("Content-Type", "").startswith("text/event-stream"):
                close_stream(answer)
                return False
            parser, quiet, opened = SseParser(), False, time.monotonic()
            try:
                while chunk := answer.read1(65536):
                    for message in parser.feed(chunk):
                        event = seen.note(event_from_sse(job_id, message))
                        failures = 0
                        yield event
                        if event.terminal:
                            return True
                # the service closed the stream (it ends each one after a few minutes): ask again, not a failure,
                # unless it closed at once (then it counts, so a service that always does is not asked forever)
                quiet = time.monotonic() - opened >= CLEAN_CLOSE_S
            except ReadTimeoutError:
                quiet = True  # nothing to say for `timeout` s (a long queue): ask again, not a failure
            except HTTPError:
                pass  # dropped: reconnect below, after the last whole message
            finally:
                close_stream(answer)
                last_id, retry_s = parser.last_id or last_id, parser.retry_s or retry_s
            _check(deadline, job_id)
            if quiet:
                continue
            failures += 1
            if failures > self.settings.retries:
                raise ConnectError(f"the event stream of job {job_id} dropped {failures} times in a row")
            self.transport.wait(Retry(failures, retry_s or self.transport.backoff(failures), None, "stream ended"))

    def _poll(self, job_id: str, seen: Seen, deadline: float | None) -> Iterator[Event]:
        wait = self.settings.poll_s
        while True:
            events = seen.from_status(self.status(job_id))
            yield from events
            if any(e.terminal for e in events):
                return
            # back to the quick poll after news; slower and slower while the job is quiet
            wait = self.settings.poll_s if events else min(self.settings.max_poll_s, wait * 1.5)
            _check(deadline, job_id)
            self.transport.sleep(min(wait, _left(deadline, wait)))

    def result(self, job: Job | str, path: str | os.PathLike | None = None) -> bytes | Path:
        """The job's zip once it has ended (waits for it): its bytes, or saved to `path` (written beside it and
        renamed into place, so a dropped download leaves no half zip). A cancelled job's partial result is
        returned; a job that failed with none raises `JobFailed`."""
        job_id = _id(job)
        for _ in self.subscribe(job_id):
            pass
        status = self.status(job_id)
        if isinstance(job, Job):
            job.status = status
        if not status.get("result"):
            cls = JobCancelled if status["state"] == "cancelled" else JobFailed
            raise cls(f"job {job_id} ended {status['state']} with no result: {_reasons(status)}", status)
        answer = self.transport.request("GET", f"/v1/jobs/{job_id}/result.zip", stream=True)
        try:
            if path is None:
                return answer.read()
            return _write(Path(path), answer)
        finally:
            close_stream(answer)

    def generate(self, prompt: str, **fields) -> Generated:
        """POST /v1/generate (one request, held until drawn): `n`, `seed`, `steps`, `size`, `target`,
        `animation`, ... as the route takes them. Retried only when the service did no work."""
        body = {"prompt": prompt, **fields, "format": "json"}
        return Generated(self.transport.json("POST", "/v1/generate", body=body, idempotent=False))

    def verify(self, file: str | os.PathLike | bytes, remote: bool | None = None) -> dict:
        """What C2PA says of an emoji file (PNG, APNG, GIF, WebP) or of every image in a set's zip ({name:
        report}). Locally with c2pa-python when it is installed (`remote` None or False), else by the
        service's POST /v1/verify."""
        from emoji_ldm.client.verify import verify

        return verify(self.transport, file, remote)


class Generated:
    """What /v1/generate answered: `images` (the files' bytes), `seeds`, `metadata`, and `response` (the rest)."""

    def __init__(self, response: dict):
        self.images = [base64.b64decode(i) for i in response.get("images", [])]
        self.seeds, self.metadata = response.get("seeds", []), response.get("metadata", [])
        self.response = {k: v for k, v in response.items() if k != "images"}

    def save(self, folder: str | os.PathLike, stem: str = "emoji") -> list[Path]:
        """Each image as <stem>-<seed>.<png|gif|webp> in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for data, seed in zip(self.images, self.seeds, strict=True):
            suffix = ".gif" if data[:4] == b"GIF8" else ".webp" if data[8:12] == b"WEBP" else ".png"
            out.append(folder / f"{stem}-{seed}{suffix}")
            out[-1].write_bytes(data)
        return out


def _id(job: Job | str) -> str:
    """The job's id as a path segment (quoted: an id from elsewhere cannot reach another route)."""
    if isinstance(job, Job):
        return quote(job.id, safe="")
    if isinstance(job, str) and job:
        return quote(job, safe="")
    raise UserError(f"job {job!r} is neither a Job nor a job id (the 'id' POST /v1/jobs answered)")


def _reasons(status: dict) -> str:
    return "; ".join(map(str, status.get("errors") or [])) or "no reason recorded"


def _left(deadline: float | None, default: float) -> float:
    return default if deadline is None else max(0.001, min(default, deadline - time.monotonic()))


def _check(deadline: float | None, job_id: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"job {job_id} has not ended within the timeout: wait longer, or follow it later with "
                           f"Client.job({job_id!r})")


def _write(path: Path, answer) -> Path:
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(part, "wb") as f:
            while piece := answer.read(1 << 20):
                f.write(piece)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path

