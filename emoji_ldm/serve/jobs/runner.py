"""A durable job's runner and drawer: the actors that draw a job once the queue (queue.py) gives it a slot.

    JobRunner: a detached, named Ray actor per job (namespace `emoji-ldm-jobs`, name `job:<owner>:<job id>`),
        │  holding no CPU; it reads request.json, then writes state.json (queued, running, done/total)
        │  a Drawer actor with the job's CPUs/GPUs, owned by the runner
        ▼
    Drawer: the model, loaded (and a compiled UNet warmed up) once; draws chunks of one pipeline call each
        │  (max_batch_size images, max_batch_pixels pixels), one ahead of the runner, which writes its PNGs, then
        ▼  state.json; at the end the zip, manifest.json, the webhook; it gives its slot back, and both exit
    <jobs_uri>/<owner>/<job id>/  request.json  state.json  images/  result/

A runner that dies with its node is restarted by Ray (`max_restarts`) and resumes after the last chunk it
recorded. A job past its `Cancel-After` deadline is cancelled as a DELETE is, and what it did not draw is
refunded.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
import traceback

from emoji_ldm.serve.jobs.files import animation_state, items_per_chunk, job_judge, package
from emoji_ldm.serve.jobs.hooks import JobHooks
from emoji_ldm.serve.jobs.store import (
    ENDED,
    REVOKED,
    REVOKED_ERROR,
    JobSpec,
    active_marker,
    iso,
    now_iso,
    public_state,
    read_request,
    read_state,
)
from emoji_ldm.serve.placement import NAMESPACE, QUEUE_NAME, actor_name
from emoji_ldm.serve.schemas import MAX_BATCH_PIXELS, JobRequest, images_per_call
from emoji_ldm.store.artifacts import delete, exists, write_bytes, write_json
from emoji_ldm.store.uri import join

logger = logging.getLogger(__name__)

DRAWER_ATTEMPTS = 3      # a job's Drawer is started again twice when its node is lost


class JobRunner:
    """A detached Ray actor that runs one job in a thread (so its methods answer while it draws)."""

    deadline: float | None = None  # epoch seconds (Cancel-After), from request.json
    expired = False                # the deadline passed, and the job was cancelled for it

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.folder = spec.folder
        self._cancel = threading.Event()
        self.request = read_request(self.folder)  # written by the queue (queue.py) before it started this runner
        self.deadline = self.request.get("deadline")
        self.began = time.monotonic()
        if exists(join(self.folder, "cancel")):
            self._cancel.set()
        self._thread = threading.Thread(target=self._run_and_exit, name="job", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        write_bytes(join(self.folder, "cancel"), b"")
        self._cancel.set()

    # --- the work -------------------------------------------------------------------------------

    def _run_and_exit(self) -> None:
        import ray

        drawn = 0
        try:
            drawn = self._run()
        finally:
            try:  # its slot, and the images/s it drew (each waiting job's ETA), back to the queue (queue.py)
                queue = ray.get_actor(QUEUE_NAME, namespace=NAMESPACE)
                ray.get(queue.release.remote(self.spec.job_id, drawn, time.monotonic() - self.began), timeout=30)
            except Exception:  # logged; the queue notices the runner is gone within CHECK_RUNNERS_S
                logger.exception("job %s: releasing its queue slot failed", self.spec.job_id)
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _run(self) -> int:
        """Draw the job, then write its end; the images drawn by this runner."""
        state = read_state(self.folder) or {}
        if state.get("state") in ENDED:
            return 0  # a runner started again for a job that has ended (a replay, a GET after a restart)
        self._past_deadline()
        request = JobRequest.model_validate(self.request["body"])
        state = {"id": self.spec.job_id, "kind": request.kind, "animation": animation_state(request),
                 "state": "queued", "done": state.get("done", 0), "total": request.images(),
                 "errors": state.get("errors", []), "created_at": self.request["created_at"],
                 "started_at": state.get("started_at"), "finished_at": None, "partial": False,
                 "result": None, "callback": None}
        first = state["done"]
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
            if self.expired:
                state["errors"].append(f"cancelled: its Cancel-After deadline ({iso(self.deadline)}) passed")
                self._refund(state)
            self._finish(state, "cancelled" if self._cancel.is_set() else "succeeded")
        except Exception as e:  # the job fails, with a reason a caller can read; the server goes on
            logger.error("job %s failed: %s", self.spec.job_id, traceback.format_exc())
            state["errors"].append(f"{type(e).__name__}: {e}")
            self._finish(state, "failed")
        return state["done"] - first

    def _past_deadline(self) -> bool:
        """Cancel the job once its Cancel-After deadline has passed."""
        if self.deadline is not None and not self.expired and time.time() >= self.deadline:
            self.expired = True
            self.cancel()
        return self.expired

    def _refund(self, state: dict) -> None:
        """A job past its deadline gives back the part it did not draw, as a cancel does."""
        if self.spec.cost_per_minute:
            from emoji_ldm.serve.meter import meter_actor

            share = 1.0 - state["done"] / state["total"] if state.get("total") else 1.0
            import ray

            ray.get(meter_actor().refund.remote(self.spec.owner, self.spec.job_id, share, self.spec.cost_per_minute,
                                                self.spec.cost_budget))

    def _draw(self, state: dict) -> None:
        """Chunks drawn by the job's Drawer (as many images as one pipeline call holds, `Drawer.step`), one chunk
        ahead: while the runner writes a chunk's PNGs and state.json, the Drawer draws the next."""
        import ray

        from emoji_ldm.inference.sampler import SampleJob
        from emoji_ldm.serve.jobs.files import JobLegibility, legibility_file

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
        return JobHooks(self.request["body"], self._webhook_secrets, self.spec.webhook_allow)

    def _webhook_secrets(self) -> tuple[str, ...]:
        """The key's live webhook secrets now (after a rotation: the new one and, for a while, the old), read from
        the key file at each delivery; a server without keys signs with its own."""
        if not self.spec.keys_uri:
            return (self.spec.webhook_secret,)
        from emoji_ldm.serve.keys import read_keys

        key = next((k for k in read_keys(self.spec.keys_uri).values() if k.owner == self.spec.owner), None)
        return key.webhook_secrets() if key is not None and not key.revoked else ()

    def _save(self, state: dict, event: str) -> None:  # on storage, then the event's webhook if the job asks
        write_json(join(self.folder, "state.json"), state)
        self._hooks.event(event, state, public_state)

    def _wait(self, ref):
        """The result of a Drawer call, or None once the job is cancelled (checked twice a second)."""
        import ray

        while not self._cancel.is_set() and not self._past_deadline():
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


def start_runner(spec: JobSpec):
    """The job's runner: this one, or the one already running under its name (never two). It holds no CPU, so
    it starts at once however busy the cluster is; its Drawer waits for the job's CPUs or GPUs."""
    import ray

    return ray.remote(JobRunner).options(
        name=actor_name(spec.owner, spec.job_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=2,
    ).remote(spec)
