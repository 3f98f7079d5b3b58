"""A durable job's names and files on shared storage: what the ingress, the queue and the runner all read.

    <jobs_uri>/<owner>/<job id>/  request.json  state.json  images/  result/  cancel  revoked
    <jobs_uri>/_active/<owner>/<job id>   (an empty object while the job has not ended)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time

from emoji_ldm.serve.schemas import MAX_BATCH_PIXELS
from emoji_ldm.store.artifacts import delete, exists, read_json, write_bytes, write_json
from emoji_ldm.store.uri import join, public_uri

ENDED = ("succeeded", "failed", "cancelled")
ANONYMOUS = "_local"      # the owner of jobs on a server without keys (a key id never starts with '_')
ACTIVE = "_active"       # <jobs_uri>/_active/<owner>/<job id>: the unfinished jobs
REVOKED = "revoked"      # <job folder>/revoked: the job's key was revoked; it is cancelled and sends no webhook
REVOKED_ERROR = "cancelled: the job's API key was revoked"


def new_job_id() -> str:
    return time.strftime("job-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(4)


def idempotent_job_id(owner: str, idempotency_key: str) -> str:
    return "job-" + hashlib.sha256(f"{owner}\0{idempotency_key}".encode()).hexdigest()[:24]


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def job_folder(jobs_uri: str, owner: str, job_id: str) -> str:
    return join(jobs_uri, owner, job_id)


def active_marker(jobs_uri: str, owner: str, job_id: str) -> str:
    """An empty object that exists while the job has not ended: what an ingress lists when it starts, to resume
    the jobs whose runners are gone (a RayService upgrade replaces the whole cluster). The listing is as long
    as the jobs running, which the keys' quotas bound, not as the jobs ever run."""
    return join(jobs_uri, ACTIVE, owner, job_id)


def active_jobs(jobs_uri: str) -> list[tuple[str, str]]:
    """(owner, job id) of every unfinished job (its marker under <jobs_uri>/_active/)."""
    import pyarrow.fs as pafs

    from emoji_ldm.store.uri import filesystem

    fs, path = filesystem(join(jobs_uri, ACTIVE))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    found = []
    for info in infos:
        if info.type == pafs.FileType.File:
            owner, job_id = info.path[len(path.rstrip("/")) + 1:].split("/", 1)
            found.append((owner, job_id))
    return found


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a runner needs; everything but the webhook secret is also in the job's request.json."""

    jobs_uri: str
    owner: str
    job_id: str
    body: dict                      # the validated JobRequest, as JSON
    body_hash: str
    model: str
    max_batch_size: int = 16
    device: str = "cpu"
    inference: object = None        # InferenceOptions
    adapter_uri: str = ""
    png_metadata: bool = True
    num_cpus: float = 1.0           # the job's Drawer (its runner holds none)
    num_gpus: float = 0.0
    webhook_secret: str = ""        # never written anywhere; on a server without keys, the one it signs with
    webhook_allow: tuple[str, ...] = ()
    max_batch_pixels: int = MAX_BATCH_PIXELS  # per pipeline call, images x size^2
    judge: str = ""                 # the server's judge (args.judge): each item's legibility; "" none
    cost_per_minute: float = 0.0    # the key's, to refund what a job past its deadline did not draw; 0: no key
    cost_budget: float = 0.0
    keys_uri: str = ""              # the key file: its webhooks are signed with the key's secrets at delivery time

    @property
    def folder(self) -> str:
        return job_folder(self.jobs_uri, self.owner, self.job_id)


def read_state(folder: str) -> dict | None:
    uri = join(folder, "state.json")
    return read_json(uri) if exists(uri) else None


def read_request(folder: str) -> dict | None:
    uri = join(folder, "request.json")
    return read_json(uri) if exists(uri) else None


def create_job(spec: JobSpec, priority: str, deadline: float | None) -> dict:
    """Write a new job's request.json and `_active` marker (the queue, queue.py, calls this one call at a time)."""
    request = {"id": spec.job_id, "owner": spec.owner, "body": spec.body, "body_hash": spec.body_hash,
               "model": spec.model, "created_at": now_iso(), "judge": public_uri(spec.judge),
               "priority": priority, "deadline": deadline}
    write_json(join(spec.folder, "request.json"), request)
    write_bytes(active_marker(spec.jobs_uri, spec.owner, spec.job_id), b"")
    return request


def end_unstarted(spec: JobSpec, error: str | None = None) -> None:
    """Write the end of a job cancelled while it waited in line, with no runner: its state, and no marker."""
    from emoji_ldm.serve.jobs.files import animation_state
    from emoji_ldm.serve.schemas import JobRequest

    state = read_state(spec.folder) or {}
    if state.get("state") in ENDED:
        return
    request = JobRequest.model_validate(spec.body)
    state = {"id": spec.job_id, "kind": request.kind, "animation": animation_state(request), "state": "cancelled",
             "done": 0, "total": request.images(), "errors": [*state.get("errors", []), *([error] if error else [])],
             "created_at": (read_request(spec.folder) or {}).get("created_at"), "started_at": None,
             "finished_at": now_iso(), "partial": False, "result": None, "callback": None}
    write_json(join(spec.folder, "state.json"), state)
    delete(active_marker(spec.jobs_uri, spec.owner, spec.job_id))


def now_iso() -> str:
    return iso(time.time())


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def public_state(state: dict, base: str = "") -> dict:
    """What GET /v1/jobs/{id} and the webhook say: the state, progress, errors, and the result's links."""
    result = state.get("result")
    links = None
    if result:
        links = {"uri": result["uri"], "zip": f"{base}/v1/jobs/{state['id']}/result.zip",
                 "manifest": f"{base}/v1/jobs/{state['id']}/manifest.json"}
    return {"id": state["id"], "kind": state.get("kind"), "animation": state.get("animation"), "state": state["state"],
            "progress": {"done": state.get("done", 0), "total": state.get("total")},
            "errors": state.get("errors", []), "partial": state.get("partial", False),
            "created_at": state.get("created_at"), "started_at": state.get("started_at"),
            "finished_at": state.get("finished_at"), "result": links, "legibility": (result or {}).get("legibility"),
            "callback": {k: v for k, v in (state.get("callback") or {}).items() if k != "url"} or None,
            **({"queue": state["queue"]} if state.get("queue") else {})}
