"""The durable jobs routes (/v1/jobs) of the Ingress: create (idempotent by `Idempotency-Key`), read,
cancel, and the result's zip and manifest streamed from storage. The jobs themselves (runner actors,
state on shared storage) are runner.py and queue.py; callbacks are checked by serve/webhooks.py."""

import asyncio
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from emoji_ldm.serve import meter
from emoji_ldm.serve.errors import ApiError
from emoji_ldm.serve.jobs import queue as job_queue
from emoji_ldm.serve.jobs import quota, store
from emoji_ldm.serve.jobs.files import animation_state, check_loops_fit
from emoji_ldm.serve.limits import cancel_after, check_adapter, check_job_pixels, check_pixels, check_priority
from emoji_ldm.serve.placement import job_slots, runner
from emoji_ldm.serve.schemas import JobRequest
from emoji_ldm.serve.sets import check_judge
from emoji_ldm.store.artifacts import write_bytes, write_json
from emoji_ldm.store.uri import join

logger = logging.getLogger("ray.serve")

JOB_ID = re.compile(r"job-[0-9a-z-]{8,40}")
# A callback's host is looked up on a pool of its own, within a deadline: a name server that never answers holds
# one of these threads, not the default pool that every other blocking call of the replica shares; and one key
# holds at most one of them at a time (`_one_check`), so one tenant's slow names never hold up another's check.
_CALLBACK_CHECKS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="callback-check")
CALLBACK_CHECK_S = 5.0
_CHECKING: dict[str, asyncio.Lock] = {}  # owner -> its one callback check at a time, on this replica


def _owner(request: Request):
    """(owner, its key or None): jobs live under the caller's key id (`ApiKey.owner`), never its name, which a
    later key may be given after a revoke."""

    key = request.scope.get("state", {}).get("api_key")
    return (key.owner if key else store.ANONYMOUS), key


def _webhook_secret(key) -> str:
    return key.webhook_secret if key else os.environ.get("EMOJI_LDM_WEBHOOK_SECRET", "")


class JobRoutes:
    """The /v1/jobs routes of one Ingress replica, given its `AppArgs` and its keyring (None: no keys)."""

    def __init__(self, args, keyring=None, model_card=None):
        self.args, self.keyring = args, keyring
        self.model_card = model_card  # async () -> the model's card (its image_size: a job's size by default)
        self._expired_at = None  # when retention last ran (serve/jobs/retention.py)
        self._stored = None  # each key's stored bytes (quota.StoredBytes), measured at most every minute
        self._configured = False  # the job queue's slots set by this replica

    def add_to(self, api: FastAPI) -> None:
        api.post("/v1/jobs", status_code=202)(self.create_job)
        api.get("/v1/jobs/{job_id}")(self.get_job)
        api.get("/v1/jobs/{job_id}/events", response_class=Response,
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "the job's events (serve/jobs/events.py), resumed after Last-Event-ID"}}
                )(self.job_events)
        api.delete("/v1/jobs/{job_id}", status_code=202)(self.cancel_job)
        api.post("/v1/jobs/{job_id}/redeliver")(self.redeliver)
        api.get("/v1/jobs/{job_id}/result.zip", response_class=Response,
                responses={200: {"content": {"application/zip": {}}}})(self.job_zip)
        api.get("/v1/jobs/{job_id}/manifest.json", response_class=Response)(self.job_manifest)

    def sweep_forever(self) -> None:
        """`sweep` when the ingress starts and every `sweep_s` after."""
        import time

        while True:
            if self.args.jobs_uri:
                self.sweep()
            self.expire()
            time.sleep(self.args.sweep_s)

    def expire(self, force: bool = False) -> None:
        """Delete the job folders and stored sets past `retention_days` (serve/jobs/retention.py): when the ingress
        starts, then at most every retention.EVERY_S."""
        import time

        from emoji_ldm.serve.jobs import retention

        days = self.args.retention_days
        if not days or (not force and self._expired_at is not None and
                        time.monotonic() - self._expired_at < retention.EVERY_S):
            return
        self._expired_at = time.monotonic()
        for uri, expire in ((self.args.jobs_uri, retention.expire_jobs), (self.args.sets_uri, retention.expire_sets)):
            if uri:
                try:
                    expire(uri, days)
                except Exception:  # logged; the next round tries again
                    logger.exception("retention of %s failed", uri)

    def sweep(self) -> None:
        """Over the unfinished jobs (their markers under <jobs_uri>/_active/, as many as jobs running, which the
        quotas bound): cancel those of a revoked key (no webhook is sent for them), and start a runner for each
        that has none (the cluster was replaced): they go on with no one asking. Best effort: a job's next GET
        resumes it too."""

        try:
            for owner, job_id in store.active_jobs(self.args.jobs_uri):
                folder = store.job_folder(self.args.jobs_uri, owner, job_id)
                key = self.keyring.by_owner(owner) if self.keyring else None
                if self.keyring and key is None and owner != store.ANONYMOUS:
                    job_queue.cancel_revoked(self.args.jobs_uri, owner, job_id)
                    logger.info("cancelled job %s of %s: its key was revoked", job_id, owner)
                    continue
                if runner(owner, job_id) is not None or job_queue.ask("place", owner, job_id) is not None:
                    continue
                known = store.read_request(folder)
                if known is None or (self.keyring and key is None):
                    continue  # no request (a half-made job) or a server with keys and a local job: left as it is
                self._submit(self._job_spec(owner, key, job_id, known["body"], known["body_hash"]))
                logger.info("job %s of %s is back in line: it had no runner and no place", job_id, owner)
        except Exception:  # logged with its traceback; the jobs resume on their next GET
            logger.exception("the jobs sweep failed")

    def _jobs_on(self) -> None:
        if not self.args.jobs_uri:
            raise ApiError(409, "this server runs no jobs (its operator did not set jobs_uri / --jobs-uri); "
                                "use /v1/emoji-sets, or `emoji-ldm bulk`")

    async def _job_folder(self, request: Request, job_id: str) -> tuple[str, str, dict]:
        """(owner, folder, state) of the caller's job; 404 for another key's job or none."""

        self._jobs_on()
        owner, _ = _owner(request)
        if not JOB_ID.fullmatch(job_id):
            raise ApiError(404, f"no job {job_id!r}")
        folder = store.job_folder(self.args.jobs_uri, owner, job_id)
        state = await asyncio.to_thread(store.read_state, folder)
        if state is None:
            request_json = await asyncio.to_thread(store.read_request, folder)
            if request_json is None:
                raise ApiError(404, f"no job {job_id!r} for this key")
            state = {"id": job_id, "state": "queued", "done": 0, "total": None, "created_at":
                     request_json["created_at"]}
        return owner, folder, state

    def _job_spec(self, owner: str, key, job_id: str, body: dict, digest: str):

        args = self.args
        device = args.device if args.device != "auto" else ("cuda" if args.job_num_gpus else "cpu")
        return store.JobSpec(args.jobs_uri, owner, job_id, body, digest, args.model, args.max_batch_size,
                       device, args.inference(), args.adapters.get(body.get("adapter") or "", ""),
                       args.png_metadata, args.job_num_cpus, args.job_num_gpus, _webhook_secret(key),
                       tuple(args.webhook_allow), args.max_batch_pixels, args.judge,
                       key.cost_per_minute if key else 0.0, key.budget if key else 0.0,
                       keys_uri=args.keys if key else "")

    def _submit(self, spec, priority: str = "normal", deadline: float | None = None) -> str:
        """Put the job in the fair queue (job_queue.py), making it if it is new: the body hash it was made with.
        The first call of this replica sets the queue's slots (args.job_slots; 0: what the cluster holds)."""

        if not self._configured:
            slots = self.args.job_slots or job_slots(self.args.job_num_cpus, self.args.job_num_gpus)
            job_queue.queue_actor(slots)
            self._configured = True
        return job_queue.ask("submit", spec, priority, deadline)

    async def _check_callback(self, url: str, key) -> None:
        from emoji_ldm.serve.webhooks import CallbackRefused, check_callback

        if not _webhook_secret(key):
            raise ApiError(422, "callback_url: this server has no webhook secret to sign with (no API keys and "
                                "no EMOJI_LDM_WEBHOOK_SECRET)", "callback_url")
        turn = _CHECKING.setdefault(getattr(key, "owner", ""), asyncio.Lock())

        async def one_check():
            await turn.acquire()
            checking = asyncio.get_running_loop().run_in_executor(_CALLBACK_CHECKS, check_callback, url,
                                                                  self.args.webhook_allow)
            checking.add_done_callback(lambda _: turn.release())  # the key's turn ends when its thread is free
            await asyncio.shield(checking)  # past the deadline the lookup runs on, holding the turn

        try:
            await asyncio.wait_for(one_check(), CALLBACK_CHECK_S)
        except CallbackRefused as e:
            raise ApiError(400, str(e), "callback_url") from None
        except TimeoutError:
            raise ApiError(400, f"callback_url: its host did not resolve within {CALLBACK_CHECK_S:g} s",
                           "callback_url") from None

    async def create_job(self, body: JobRequest, request: Request):
        """Start a set or bulk job; 202 with its id. `Idempotency-Key`: a replay returns the same job, the same
        key with another body is a 409."""

        self._jobs_on()
        check_judge(body, self.args.judge)  # min_legibility needs the server's judge: a 409 before any work
        owner, key = _owner(request)
        check_adapter(body.adapter, self.args.adapters)
        check_priority(body.priority, key)
        deadline = cancel_after(request.headers.get("cancel-after"))
        if body.size:  # a job is drawn a pipeline call at a time: one image of its size must fit a call
            check_pixels(0, body.size, self.args.max_batch_pixels)
        drawn = body.size or ((await self.model_card()).get("image_size") if self.model_card else None)
        if drawn:
            check_job_pixels(body.images() * max(1, body.animation.frames), drawn, own_size=not body.size)
        await asyncio.to_thread(check_loops_fit, body)  # now, not once every loop is drawn (job_files.py)
        data = body.model_dump(mode="json")
        if not body.animation.frames:  # a still job's body (and so its Idempotency-Key hash) as before loops
            data.pop("animation")
        digest = store.body_hash(data)
        idempotency = request.headers.get("idempotency-key", "").strip()
        if len(idempotency) > 255:
            raise ApiError(400, "Idempotency-Key is longer than 255 characters")
        if idempotency:
            job_id = store.idempotent_job_id(owner, idempotency)
            known = await asyncio.to_thread(store.read_request, store.job_folder(self.args.jobs_uri, owner, job_id))
            if known is not None:
                return await self._same_job(request, job_id, known["body_hash"], digest)
        else:
            job_id = store.new_job_id()
        await self._admit(owner, key, job_id, body, drawn)  # first: a refused job costs no name lookup
        try:
            if body.callback_url:
                await self._check_callback(body.callback_url, key)
            spec = self._job_spec(owner, key, job_id, data, digest)
            stored = await asyncio.to_thread(self._submit, spec, body.priority, deadline)
        except BaseException:
            if key is not None:  # it never started (a refused callback): its whole charge back
                await meter.ask("refund", owner, job_id, 1.0, key.cost_per_minute, key.budget)
            raise
        finally:
            if key is not None:  # counted by its place in the queue from now on (or it never will be: refused)
                await meter.ask("started", owner, job_id)
        if idempotency:
            return await self._same_job(request, job_id, stored, digest, created=True)
        return JSONResponse(store.public_state({"id": job_id, "kind": body.kind, "animation": animation_state(body),
                                                 "state": "queued", "total": body.images(),
                                                 "created_at": store.now_iso()}), status_code=202,
                            headers={"Location": f"/v1/jobs/{job_id}"})

    async def _admit(self, owner: str, key, job_id: str, body: JobRequest, drawn: int | None) -> None:
        """The key's concurrent-jobs quota, its cost budget (the job's whole cost, charged now) and its
        stored-bytes quota, decided in one step by the one meter actor for every replica (serve/meter.py,
        serve/jobs/quota.py): of ten concurrent posts with room for one, one is admitted. 429 with the figures."""
        if key is None:
            return
        if self._stored is None:
            self._stored = quota.StoredBytes(self.args.jobs_uri)
        stored = await asyncio.to_thread(self._stored.of, owner)
        decision = await meter.ask("admit_job", owner, job_id, key.max_jobs, quota.job_cost(body, drawn or 0),
                                   key.cost_per_minute, key.budget, quota.job_bytes(body, drawn or 0), stored,
                                   key.max_stored_bytes)
        if not decision.get("ok"):
            raise quota.refusal(decision if "refused" in decision else {"refused": "jobs"}, key)

    async def _same_job(self, request: Request, job_id: str, stored: str, digest: str, created: bool = False):

        if stored != digest:
            raise ApiError(409, "Idempotency-Key was used with a different body: send the same body to get its "
                                "job, or use a new key for a new job")
        _, _, state = await self._job_folder(request, job_id)
        return JSONResponse(store.public_state(state), status_code=202,
                            headers={"Location": f"/v1/jobs/{job_id}", **({} if created else
                                                                          {"Idempotent-Replayed": "true"})})

    async def get_job(self, job_id: str, request: Request) -> dict:
        """State, progress (done/total), errors and, when it has ended, links to the zip and manifest."""

        owner, folder, state = await self._job_folder(request, job_id)
        return store.public_state(await self._resumed(request, owner, job_id, folder, state))

    async def _resumed(self, request: Request, owner: str, job_id: str, folder: str, state: dict) -> dict:
        """The job's state, with its place in line while it waits (`queue`: position, ETA, priority); a job that
        has not ended and has neither a runner nor a place (a node or the whole cluster restarted) is put back
        in line, to resume after the last chunk it recorded."""

        if state["state"] in store.ENDED:
            return state
        place = await asyncio.to_thread(job_queue.ask, "place", owner, job_id)
        if place is None and await asyncio.to_thread(runner, owner, job_id) is None:
            _, _, state = await self._job_folder(request, job_id)  # it may have just ended
            if state["state"] not in store.ENDED:
                known = await asyncio.to_thread(store.read_request, folder)
                _, key = _owner(request)
                spec = self._job_spec(owner, key, job_id, known["body"], known["body_hash"])
                await asyncio.to_thread(self._submit, spec)
                place = await asyncio.to_thread(job_queue.ask, "place", owner, job_id)
        if place and place["state"] == "waiting" and state["state"] == "queued":
            state = {**state, "queue": {k: place[k] for k in ("position", "eta_s", "priority")}}
        return state

    async def job_events(self, job_id: str, request: Request):
        """The job's events as server-sent events (serve/events.py), from shared storage, so any replica serves
        them; `Last-Event-ID` resumes after that event. Another key's job is a 404, as for GET."""
        from fastapi.responses import StreamingResponse

        from emoji_ldm.serve.jobs import events

        owner, folder, state = await self._job_folder(request, job_id)
        try:
            after = events.last_event_id(request.headers.get("last-event-id"))
        except ValueError as e:
            raise ApiError(400, str(e), "Last-Event-ID") from None
        state = await self._resumed(request, owner, job_id, folder, state)
        total = state.get("total")
        if total is None:  # no state.json yet: the total from the request, so the ids never move
            total = JobRequest.model_validate((await asyncio.to_thread(store.read_request, folder))["body"]).images()

        async def read() -> dict:
            now = await asyncio.to_thread(store.read_state, folder) or state
            return {**now, "total": now.get("total") or total}

        async def queue() -> dict:

            place = await asyncio.to_thread(job_queue.ask, "place", owner, job_id) or {}
            return {"position": place.get("position"), "eta_s": place.get("eta_s")}

        return StreamingResponse(events.stream(read, after, queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def cancel_job(self, job_id: str, request: Request) -> dict:
        """Cancel: the runner stops after its current chunk; what it drew is packaged and marked partial."""

        owner, folder, state = await self._job_folder(request, job_id)
        if state["state"] in store.ENDED:
            return store.public_state(state)
        await asyncio.to_thread(write_bytes, join(folder, "cancel"), b"")  # a runner that starts later sees it
        actor = await asyncio.to_thread(runner, owner, job_id)
        if actor is not None:
            await actor.cancel.remote()
        else:  # waiting in line: its runner starts in the queue's closing lane, and ends it at once

            await asyncio.to_thread(job_queue.ask, "cancel", job_id)
        _, key = _owner(request)
        if key is not None:  # the images not drawn yet go back to the key's budget (once, however many cancels)
            share = 1.0 - state["done"] / state["total"] if state.get("total") else 1.0
            await meter.ask("refund", owner, job_id, share, key.cost_per_minute, key.budget)
        return {**store.public_state(state), "state": "cancelling"}

    async def redeliver(self, job_id: str, request: Request) -> dict:
        """Send an ended job's final webhook again, now, once (the same `webhook-id`, so a receiver that has it
        dedupes), signed with the key's live secrets: {"callback": what happened}, also the job's record."""
        from emoji_ldm.serve.jobs.hooks import ENDS
        from emoji_ldm.serve.webhooks import deliver

        owner, folder, state = await self._job_folder(request, job_id)
        url = ((await asyncio.to_thread(store.read_request, folder)) or {}).get("body", {}).get("callback_url")
        if not url:
            raise ApiError(409, f"job {job_id} has no callback_url: there is no webhook to deliver")
        if state["state"] not in store.ENDED:
            raise ApiError(409, f"job {job_id} is {state['state']}: its webhook is sent when it ends; redeliver "
                                "after that")
        _, key = _owner(request)
        secrets = key.webhook_secrets() if key else (_webhook_secret(None),)
        event = ENDS[state["state"]]
        sent = store.public_state({**state, "callback": None})  # the payload of the first delivery, again
        outcome = await asyncio.to_thread(deliver, url, sent, secrets, self.args.webhook_allow, attempts=1,
                                          event=event, message_id=f"{job_id}_{event}")
        state["callback"] = {**outcome, "redelivered_at": store.now_iso()}
        await asyncio.to_thread(write_json, join(folder, "state.json"), state)
        return {"callback": {k: v for k, v in state["callback"].items() if k != "url"}}

    async def job_zip(self, job_id: str, request: Request):
        _, _, state = await self._job_folder(request, job_id)
        return _result_file(state, "zip", "application/zip",
                            {"Content-Disposition": f'attachment; filename="{job_id}.zip"'})

    async def job_manifest(self, job_id: str, request: Request):
        _, _, state = await self._job_folder(request, job_id)
        return _result_file(state, "manifest", "application/json")


def _result_file(state: dict, which: str, media_type: str, headers: dict | None = None):
    from fastapi.responses import StreamingResponse

    from emoji_ldm.store.uri import filesystem

    if not state.get("result"):
        raise ApiError(409, f"job {state['id']} has no result yet (state {state['state']}): poll "
                            f"/v1/jobs/{state['id']}")
    fs, path = filesystem(state["result"][which])

    def chunks():  # streamed from storage in 1 MiB pieces, never whole in this replica
        with fs.open_input_stream(path) as f:
            while piece := f.read(1 << 20):
                yield piece

    return StreamingResponse(chunks(), media_type=media_type, headers=headers)
