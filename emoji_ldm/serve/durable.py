"""Durable jobs: an emoji set or a bulk spec drawn outside the Serve replicas, its state on shared storage.

    POST /v1/jobs ──► Ingress: check the body, the key's job quota, the callback URL (webhooks.py)
                        │  a detached, named Ray actor per job (namespace `emoji-ldm-jobs`,
                        ▼  name `job:<owner>:<job id>`), holding no CPU, so it starts at once
                     JobRunner: writes request.json, then state.json (queued, running, done/total)
                        │  a Drawer actor with the job's CPUs/GPUs (it queues for them), owned by the runner
                        ▼
                     Drawer: the model, loaded (and a compiled UNet warmed up) once; draws chunks of one pipeline
                        │  call each (max_batch_size images, max_batch_pixels pixels), one ahead of the runner, which
                        ▼  writes its PNGs, then state.json; at the end the zip, manifest.json, the webhook; both exit
                     <jobs_uri>/<owner>/<job id>/  request.json  state.json  images/  result/

The owner of a job is its API key's immutable id (`ApiKey.owner`, `key-<16 hex>`, serve/keys.py), or `_local`
on a server without keys; never the key's name, which a later key can be given after a revoke.

Detached actors, not Ray jobs (a job driver per job would only add start-up time): the actor outlives a Serve
app's restart, redeploy or delete, and everything a reader needs is on the shared storage. A runner that dies
with its node is restarted by Ray (`max_restarts`) and resumes after the last chunk it recorded; if even that is
gone (a RayService upgrade replaces the whole cluster), an ingress that starts resumes every job marked
unfinished under `<jobs_uri>/_active/` that has no runner, and so does the job's next GET.

Idempotency: with an `Idempotency-Key` header the job id is a hash of the job's owner and that header,
so a replay names the same job; the actor's name is the lock (Ray creates one named actor however many
ask at once, `get_if_exists=True`), and the runner writes the job's request.json once, so ten concurrent
duplicates make one job, and the same header with another body is told apart by the body's hash (409).

A key sees only its own jobs: they live under its owner id, and a job id under another key is a 404.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import secrets
import threading
import time
import traceback

from emoji_ldm.serve.job_files import animation_state, items_per_chunk, job_judge, package
from emoji_ldm.serve.job_webhooks import JobHooks
from emoji_ldm.serve.schemas import MAX_BATCH_PIXELS, JobRequest, images_per_call
from emoji_ldm.store.artifacts import delete, exists, read_json, write_bytes, write_json
from emoji_ldm.store.uri import join, public_uri

logger = logging.getLogger(__name__)

NAMESPACE = "emoji-ldm-jobs"
ENDED = ("succeeded", "failed", "cancelled")
DRAWER_ATTEMPTS = 3      # a job's Drawer is started again twice when its node is lost
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


def actor_name(owner: str, job_id: str) -> str:
    return f"job:{owner}:{job_id}"


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


def orphaned_jobs(jobs_uri: str) -> list[tuple[str, str]]:
    """(owner, job id) of every unfinished job without a live runner."""
    return [(owner, job_id) for owner, job_id in active_jobs(jobs_uri) if runner(owner, job_id) is None]


def cancel_revoked(jobs_uri: str, owner: str, job_id: str) -> None:
    """Cancel a revoked key's job: its runner stops after its chunk, sending no webhook (the `revoked` marker)."""
    folder = job_folder(jobs_uri, owner, job_id)
    write_bytes(join(folder, REVOKED), b"")
    write_bytes(join(folder, "cancel"), b"")
    actor = runner(owner, job_id)
    if actor is not None:
        import ray

        ray.get(actor.cancel.remote())
        return
    state = read_state(folder) or {"id": job_id, "done": 0, "created_at": None}
    if state.get("state") not in ENDED:
        state.update(state="cancelled", finished_at=now_iso(), partial=False, result=None,
                     errors=[*state.get("errors", []), REVOKED_ERROR])
        write_json(join(folder, "state.json"), state)
    delete(active_marker(jobs_uri, owner, job_id))


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
    webhook_secret: str = ""        # never written anywhere
    webhook_allow: tuple[str, ...] = ()
    max_batch_pixels: int = MAX_BATCH_PIXELS  # per pipeline call, images x size^2
    judge: str = ""                 # the server's judge (args.judge): each item's legibility; "" none

    @property
    def folder(self) -> str:
        return job_folder(self.jobs_uri, self.owner, self.job_id)


def read_state(folder: str) -> dict | None:
    uri = join(folder, "state.json")
    return read_json(uri) if exists(uri) else None


def read_request(folder: str) -> dict | None:
    uri = join(folder, "request.json")
    return read_json(uri) if exists(uri) else None


class JobRunner:
    """A detached Ray actor that runs one job in a thread (so its methods answer while it draws)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.folder = spec.folder
        self._cancel = threading.Event()
        request = read_request(self.folder)
        if request is None:  # the one writer: this actor holds the job's name
            request = {"id": spec.job_id, "owner": spec.owner, "body": spec.body, "body_hash": spec.body_hash,
                       "model": spec.model, "created_at": now_iso(), "judge": public_uri(spec.judge)}
            write_json(join(self.folder, "request.json"), request)
            write_bytes(active_marker(spec.jobs_uri, spec.owner, spec.job_id), b"")
        self.request = request
        if exists(join(self.folder, "cancel")):
            self._cancel.set()
        self._thread = threading.Thread(target=self._run_and_exit, name="job", daemon=True)
        self._thread.start()

    def stored_body_hash(self) -> str:
        """The hash of the body this job was created with (the caller compares it with its own)."""
        return self.request["body_hash"]

    def cancel(self) -> None:
        write_bytes(join(self.folder, "cancel"), b"")
        self._cancel.set()

    # --- the work -------------------------------------------------------------------------------

    def _run_and_exit(self) -> None:
        import ray

        try:
            self._run()
        finally:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _run(self) -> None:
        state = read_state(self.folder) or {}
        if state.get("state") in ENDED:
            return  # a runner started again for a job that has ended (a replay, a GET after a restart)
        request = JobRequest.model_validate(self.request["body"])
        state = {"id": self.spec.job_id, "kind": request.kind, "animation": animation_state(request),
                 "state": "queued", "done": state.get("done", 0), "total": request.images(),
                 "errors": state.get("errors", []), "created_at": self.request["created_at"],
                 "started_at": state.get("started_at"), "finished_at": None, "partial": False,
                 "result": None, "callback": None}
        from ray.exceptions import RayActorError

        try:
            for attempt in range(DRAWER_ATTEMPTS):
                try:
                    self._draw(state)
                    break
                except RayActorError as e:  # the Drawer's node went away: a new one resumes after the last chunk
                    if attempt + 1 == DRAWER_ATTEMPTS:
                        raise
                    state["errors"].append(f"the drawer was lost ({type(e).__name__}); drawing again from "
                                           f"image {state['done']}")
            self._finish(state, "cancelled" if self._cancel.is_set() else "succeeded")
        except Exception as e:  # the job fails, with a reason a caller can read; the server goes on
            logger.error("job %s failed: %s", self.spec.job_id, traceback.format_exc())
            state["errors"].append(f"{type(e).__name__}: {e}")
            self._finish(state, "failed")

    def _draw(self, state: dict) -> None:
        """Chunks drawn by the job's Drawer (as many images as one pipeline call holds, `Drawer.step`), one chunk
        ahead: while the runner writes a chunk's PNGs and state.json, the Drawer draws the next."""
        import ray

        from emoji_ldm.inference.sampler import SampleJob
        from emoji_ldm.serve.job_files import JobLegibility, legibility_file

        request = JobRequest.model_validate(self.request["body"])
        draws = request.draws()
        if state["done"] >= len(draws) or self._cancel.is_set():
            return
        judge = job_judge(self.request, self.spec.judge)  # the one the job was made with, or it fails here
        legibility = JobLegibility(judge, request) if judge else None  # loaded before the Drawer starts
        self._save(state, "queued")  # waiting for the Drawer's CPUs/GPUs
        drawer = ray.remote(Drawer).options(num_cpus=self.spec.num_cpus, num_gpus=self.spec.num_gpus).remote(
            self.spec.model, self.spec.device, self.spec.inference, request.adapter, self.spec.adapter_uri,
            request.size, self.spec.max_batch_size, self.spec.max_batch_pixels)
        step = self._wait(drawer.ready.remote())  # images per pipeline call (a loop's frames, for an animation)
        if step is None:
            return
        items = items_per_chunk(step, request)
        state.update(state="running", started_at=state.get("started_at") or now_iso())
        self._save(state, "started")
        settings, animation = request.sampler(), request.animation.settings()

        def redraw(prompt: str, seed: int):  # one item again (job_files.JobLegibility), after the chunk ahead
            job = SampleJob.of((prompt,), (seed,), settings, request.adapter, animation)
            return self._wait(drawer.pngs.remote(job, self.spec.png_metadata, step))

        def submit(start: int):  # loops as the sets draw them: `Sampler.pngs` with the job's animation
            chunk = draws[start:start + items]
            job = SampleJob.of(tuple(p for _, p, _ in chunk), tuple(s for _, _, s in chunk), settings,
                               request.adapter, animation)
            return drawer.pngs.remote(job, self.spec.png_metadata, step)

        starts = list(range(state["done"], len(draws), items))
        pending = submit(starts[0])
        for i, start in enumerate(starts):
            made = self._wait(pending)
            if made is None:
                return
            if i + 1 < len(starts):
                pending = submit(starts[i + 1])
            records = legibility.chunk(start, made, redraw) if legibility else None  # measured, maybe redrawn
            if records is not None and self._cancel.is_set():
                return  # cancelled during a redraw: the chunk is not recorded
            for k, (png, params) in enumerate(made):
                write_bytes(join(self.folder, "images", f"{start + k:05d}.png"), png)
                write_json(join(self.folder, "images", f"{start + k:05d}.json"), params)
                if records is not None:
                    write_json(legibility_file(self.folder, start + k), records[k])
            state["done"] = start + len(made)
            self._save(state, "progress")

    @functools.cached_property
    def _hooks(self) -> JobHooks:  # the job's webhooks (serve/job_webhooks.py), made on first use
        return JobHooks(self.request["body"], self.spec.webhook_secret, self.spec.webhook_allow)

    def _save(self, state: dict, event: str) -> None:  # on storage, then the event's webhook if the job asks
        write_json(join(self.folder, "state.json"), state)
        self._hooks.event(event, state, public_state)

    def _wait(self, ref):
        """The result of a Drawer call, or None once the job is cancelled (checked twice a second)."""
        import ray

        while not self._cancel.is_set():
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                return ray.get(ref)
        return None

    def _finish(self, state: dict, outcome: str) -> None:
        if state["done"]:
            try:
                state["result"] = self._package(state["done"], partial=outcome != "succeeded")
            except Exception as e:
                logger.error("job %s: packaging failed: %s", self.spec.job_id, traceback.format_exc())
                state["errors"].append(f"packaging the result: {type(e).__name__}: {e}")
                outcome = "failed"
        state.update(state=outcome, partial=outcome != "succeeded" and state["done"] > 0, finished_at=now_iso())
        write_json(join(self.folder, "state.json"), state)
        delete(active_marker(self.spec.jobs_uri, self.spec.owner, self.spec.job_id))
        url = self.request["body"].get("callback_url")
        if url and exists(join(self.folder, REVOKED)):  # the key's owner no longer gets anything from us
            state["errors"].append(REVOKED_ERROR)
            state["callback"] = {"attempts": 0, "delivered": False, "error": "not sent: the key was revoked"}
            write_json(join(self.folder, "state.json"), state)
        elif url and (delivery := self._hooks.final(public_state(state))) is not None:  # if its events ask
            state["callback"] = delivery
            write_json(join(self.folder, "state.json"), state)

    def _package(self, done: int, partial: bool) -> dict:
        """The set's files for the `done` images drawn: result/<id>.zip and result/manifest.json (job_files.py)."""
        return package(self.folder, self.spec.job_id, self.spec.model, self.request["body"], done, partial,
                       self.spec.png_metadata, job_judge(self.request, self.spec.judge))


class Drawer:
    """The job's model: a Ray actor with the job's CPUs or GPUs, owned by its runner (and gone with it). It draws
    `step` images per pipeline call: max_batch_size, fewer where they would be more than max_batch_pixels."""

    def __init__(self, model: str, device: str, inference, adapter: str | None, adapter_uri: str,
                 size: int | None = None, max_batch_size: int = 16, max_batch_pixels: int = MAX_BATCH_PIXELS):
        from emoji_ldm.inference.sampler import SampleJob, Sampler

        self.sampler = Sampler.load(model, device=device, options=inference)
        if adapter:
            self.sampler.load_adapter(adapter, adapter_uri)
        size = size or self.sampler.image_size
        self.step = images_per_call(size, max_batch_size, max_batch_pixels)
        if inference is not None and inference.compile:
            # as a Generator replica does: the compiled UNet runs at batch 1 and at the chunk's size (at the job's
            # image size) before the job is running, so its first chunk does not pay the compile
            for n in sorted({1, self.step}):
                self.sampler.sample([SampleJob(("warm-up",) * n, tuple(range(n)), steps=2, scheduler=None, size=size,
                                               adapter=adapter)], max_batch=n)

    def ready(self) -> int:
        """Images per chunk, once the model is loaded (and warmed up)."""
        return self.step

    def pngs(self, job, metadata: bool, max_batch: int) -> list[tuple[bytes, dict]]:
        (made,) = self.sampler.pngs([job], metadata=metadata, max_batch=max_batch)
        return made


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
            "callback": {k: v for k, v in (state.get("callback") or {}).items() if k != "url"} or None}


# --- the ingress side -------------------------------------------------------------------------


def runner(owner: str, job_id: str):
    """The live runner actor of a job, or None."""
    import ray

    try:
        return ray.get_actor(actor_name(owner, job_id), namespace=NAMESPACE)
    except ValueError:
        return None


def start_runner(spec: JobSpec):
    """The job's runner: this one, or the one already running under its name (never two). It holds no CPU, so
    it starts at once however busy the cluster is; its Drawer waits for the job's CPUs or GPUs."""
    import ray

    return ray.remote(JobRunner).options(
        name=actor_name(spec.owner, spec.job_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=2,
    ).remote(spec)
