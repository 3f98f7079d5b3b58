"""The Serve application: a FastAPI ingress in front of a batched, autoscaled model deployment.

    HTTP ──► Ingress (FastAPI: validation, web page, zips, set storage)
                │  DeploymentHandle, requests split into pieces of <= max_batch_size images
                ▼
             Generator (one diffusers pipeline per replica; @serve.batch packs concurrent
                        requests into one pipeline call; autoscaled by ongoing requests)

Input: a model folder/URI (a diffusers pipeline with model_card.json, local or
S3). Output: PNGs over HTTP; emoji sets as zips, or stored under the
operator's `sets_uri`. Entry points: `build_app` (the `import_path` of
`serve_config.yaml`, used by `serve run`, `serve deploy` and the RayService)
and `application` (the same with deployment options, used by `emoji-ldm serve`).

Replica options (autoscaling, max_ongoing_requests, max_queued_requests, CPUs
and GPUs) live in `serve_config.yaml`, not here: one file for every way of
deploying.
"""

import asyncio
import base64
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from emoji_ldm import __version__
from emoji_ldm.inference.sampler import SampleJob
from emoji_ldm.runtime.heap import release_free_heap
from emoji_ldm.serve.schemas import EmojiSetRequest, GenerateRequest, JobRequest

logger = logging.getLogger("ray.serve")

JOB_ID = re.compile(r"job-[0-9a-z-]{8,40}")
MAX_BODY_BYTES = 256 * 1024  # 256 items of 500 characters fit; anything bigger is refused with 413


@dataclass(frozen=True)
class AppArgs:
    """The application's `args:` in the Serve config (or `emoji-ldm serve` flags)."""

    model: str
    sets_uri: str = ""               # where `"store": true` sets go; empty: storing is off
    max_batch_size: int = 16         # images per pipeline call
    batch_wait_timeout_s: float = 0.05
    device: str = "auto"             # auto: cuda when the replica has a GPU, else cpu
    torch_threads: int = 0           # CPU threads per replica; 0: Ray's default (the replica's num_cpus)
    png_metadata: bool = True        # generation parameters and model id as PNG text chunks (inference/pngmeta.py)
    dtype: str = "auto"              # auto: bf16 on CUDA, fp32 on CPU | fp32 | fp16 (VAE stays fp32) | bf16
    channels_last: bool = False      # UNet and VAE in channels-last memory format
    compile: bool = False            # torch.compile the UNet; warmed up before the replica takes requests
    adapters: dict = field(default_factory=dict)  # name -> LoRA folder/URI (dreambooth --method lora), per request
    keys: str = ""                   # the API key file (serve/keys.py); empty: no keys (serve binds 127.0.0.1)
    jobs_uri: str = ""               # where /v1/jobs keep their state and results (shared storage); empty: no jobs
    job_num_cpus: float = 1.0        # each job's runner actor (serve/durable.py): CPUs ...
    job_num_gpus: float = 0.0        # ... and GPUs (> 0: it draws on CUDA)
    webhook_allow: tuple = ()        # CIDRs a job's callback_url may reach besides public addresses

    def __post_init__(self):
        from emoji_ldm.errors import UserError

        if not self.model:
            raise UserError("args.model is empty: give the model folder/URI to serve")
        for name, uri in self.adapters.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", str(name)) or not uri:
                raise UserError(f"args.adapters: {name!r}={uri!r}: a name of letters, digits, '-', '_' or '.' "
                                "(at most 64) and a LoRA folder/URI")
        if not 1 <= self.max_batch_size <= 256:
            raise UserError(f"args.max_batch_size must be from 1 to 256, got {self.max_batch_size}")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise UserError(f"args.batch_wait_timeout_s must be from 0 to 10 seconds, got {self.batch_wait_timeout_s}")
        if self.torch_threads < 0:
            raise UserError(f"args.torch_threads must be 0 (Ray's default) or more, got {self.torch_threads}")
        if self.job_num_cpus < 0 or self.job_num_gpus < 0:
            raise UserError(f"args.job_num_cpus / job_num_gpus must be 0 or more, got {self.job_num_cpus} / "
                            f"{self.job_num_gpus}")
        from emoji_ldm.serve.webhooks import allowlist

        try:
            object.__setattr__(self, "webhook_allow", tuple(str(c) for c in self.webhook_allow))
            allowlist(self.webhook_allow)
        except ValueError as e:
            raise UserError(f"args.{e}") from None
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"args.device must be auto, cpu or cuda, got {self.device!r}")
        if self.compile and self.adapters:
            raise UserError("args.compile with LoRA adapters: a compiled UNet that switches adapters per request "
                            "recompiles until torch.compile gives up; serve adapters without compile, or serve "
                            "the fused model (the dreambooth run's OUT/model) compiled")
        self.inference()  # validates dtype

    def inference(self):
        from emoji_ldm.errors import UserError
        from emoji_ldm.inference.sampler import InferenceOptions

        try:
            return InferenceOptions(dtype=self.dtype, channels_last=self.channels_last, compile=self.compile)
        except UserError as e:
            raise UserError(f"args.{e}") from None


# --- the model deployment ---------------------------------------------------------


def images_in(jobs: list[SampleJob]) -> int:
    """Batch size in images, not requests (`@serve.batch` batch_size_fn)."""
    return sum(len(job.prompts) for job in jobs)


@serve.deployment(name="Generator")
class Generator:
    """One pipeline per replica; concurrent requests share pipeline calls."""

    def __init__(self, model: str, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.05,
                 device: str = "auto", torch_threads: int = 0, png_metadata: bool = True, inference=None,
                 adapters: dict | None = None):
        import torch

        from emoji_ldm.inference.sampler import model_card

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # Every torch call of this replica runs on this one thread. With OpenMP, each thread that
        # runs torch ops gets its own team of workers, and an idle team keeps spinning on the cores:
        # alternating threads (asyncio.to_thread's pool) made the UNet 2-3x slower on 2 cores.
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self.sampler = self._torch_thread.submit(self._load, model, device, torch_threads, inference).result()
        for name, uri in (adapters or {}).items():  # LoRA adapters on this one base, chosen per request
            self._torch_thread.submit(self.sampler.load_adapter, name, uri).result()
        self.warmup_s = None
        if inference is not None and inference.compile:
            # __init__ returns (and the replica, hence /healthz, is ready) only once the compiled UNet has run
            # at batch 1 and at the largest batch: the first request does not pay the compile
            self.warmup_s = self._torch_thread.submit(self.sampler.warm_up, (1, max_batch_size)).result()
            logger.info("Generator: compiled UNet warmed up in %.1f s", self.warmup_s)
        self.card = model_card(model)
        self.model = model
        self.png_metadata = png_metadata
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.requests = self.images = 0
        self.batch_sizes: list[int] = []  # images per pipeline call, the last 1000
        logger.info("Generator: %s on %s, max batch %d images", model, device, max_batch_size)

    @staticmethod
    def _load(model: str, device: str, torch_threads: int, inference):
        import torch

        from emoji_ldm.inference.sampler import Sampler

        if torch_threads:
            torch.set_num_threads(torch_threads)
        return Sampler.load(model, device=device, options=inference)

    async def sample(self, job: SampleJob) -> list[tuple[bytes, dict]]:
        """(PNG bytes, generation parameters) per image of one job (at most max_batch_size images)."""
        self.requests += 1
        return await self._batch(job)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=images_in)
    async def _batch(self, jobs: list[SampleJob]) -> list[list[tuple[bytes, dict]]]:
        # off the event loop, so the replica keeps accepting (and queueing) requests meanwhile
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, self._sample_pngs, jobs)

    def _sample_pngs(self, jobs: list[SampleJob]) -> list[list[tuple[bytes, dict]]]:
        size = images_in(jobs)
        self.images += size
        self.batch_sizes = (self.batch_sizes + [size])[-1000:]
        made = self.sampler.pngs(jobs, metadata=self.png_metadata)
        release_free_heap()  # a replica lives for days: the call's freed activations back to the OS (issue 28)
        return made

    def model_card(self) -> dict:
        """The card, with where the model is (`uri`: the folder with model_index.json, absolute)."""
        unet = self.sampler.pipe.unet
        return {**self.card, "uri": self.sampler.model_uri, "image_size": self.sampler.image_size,
                "adapters": sorted(self.sampler.adapters.values(), key=lambda a: a["name"]),
                "runtime": {"device": str(unet.device), "dtype": str(unet.dtype).removeprefix("torch."),
                            "vae_dtype": str(self.sampler.pipe.vae.dtype).removeprefix("torch."),
                            "compiled": self.warmup_s is not None, "warmup_s": self.warmup_s}}

    def stats(self) -> dict:
        """Counters of this replica: requests in, pipeline calls made, images made, recent batch sizes."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, "requests": self.requests,
                "calls": self.sampler.calls, "images": self.images, "batch_sizes": self.batch_sizes[-50:]}


# --- the HTTP ingress ----------------------------------------------------------------

api = FastAPI(
    title="emoji-ldm",
    version=__version__,
    description="Generate emoji and themed emoji sets from a trained emoji-ldm model. "
                "Errors are JSON: `{\"error\": message, \"field\": name or null}`.",
)


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def error_response(status: int, message: str, field: str | None = None, headers: dict | None = None):
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.field, exc.headers)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError):
    """422 naming the first bad field (all of them under `errors`); malformed JSON is a 400."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    message = first["msg"].removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "required"
    details = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or None,
                "error": e["msg"].removeprefix("Value error, ")} for e in errors]
    return JSONResponse({"error": f"{field}: {message}" if field else message, "field": field, "errors": details},
                        status_code=422)


class BodyLimit:
    """413 with our JSON for bodies over `max_bytes`, by Content-Length or while streaming.

    (FastAPI's own `max_body_size` answers a declared oversize body in plain text, which would
    break the API's one error shape.)
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope, receive, send):
        await error_response(413, _TooLarge(self.max_bytes).detail)(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing passes it on to `_http_error` instead of a generic 400."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is larger than {max_bytes} bytes: send fewer or shorter prompts, "
                              "or split the set")


api.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


class KeyCheck:
    """With keys configured (`api.state.keyring`, set by the Ingress), every /v1/ request needs a valid key
    within its rate, checked before the body is read and before any model replica is asked: 401 or 429 JSON
    otherwise. The key goes to the handler as `request.state.api_key`. `/`, `/docs` and `/healthz` stay
    open: they do no work."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        from emoji_ldm.serve.keys import AuthError

        keyring = getattr(scope.get("app").state, "keyring", None) if scope.get("app") else None
        if scope["type"] != "http" or keyring is None or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            key = keyring.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
            keyring.meter(key)
        except AuthError as e:
            return await error_response(e.status, e.message, headers=e.headers)(scope, receive, send)
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


api.add_middleware(KeyCheck)  # added last, so it runs first: no body is read for a caller without a key


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    """Anything unexpected: its traceback in the replica's log, a JSON 500 to the caller (no internals)."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}): the server's log has the details")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """Starlette's own errors (404, 405) in the same JSON shape."""
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def _settings(body) -> dict:
    return body.model_dump(include={"negative_prompt", "steps", "guidance", "seed", "scheduler", "size", "adapter"})


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, args: dict):
        from emoji_ldm.serve.keys import KeyRing

        self.generator = generator
        self.args = AppArgs(**args)
        self._card: dict | None = None
        api.state.keyring = KeyRing(self.args.keys) if self.args.keys else None
        if self.args.jobs_uri:  # jobs left without a runner (the cluster was replaced) go on with no one asking
            threading.Thread(target=self._resume_orphans, name="resume-jobs", daemon=True).start()

    def _resume_orphans(self) -> None:
        from emoji_ldm.serve import durable

        try:
            for owner, job_id in durable.orphaned_jobs(self.args.jobs_uri):
                known = durable.read_request(durable.job_folder(self.args.jobs_uri, owner, job_id))
                keyring = api.state.keyring
                key = keyring.by_name(owner) if keyring else None
                if known is None or (keyring and key is None):
                    continue  # no request (a half-made job) or a revoked key: left as it is
                durable.start_runner(self._job_spec(owner, key, job_id, known["body"], known["body_hash"]))
                logger.info("resumed job %s of %s: its runner was gone", job_id, owner)
        except Exception:  # resuming is best effort: the job's next GET resumes it too
            logger.exception("resuming unfinished jobs failed")

    async def _model_card(self) -> dict:
        if self._card is None:
            self._card = await self.generator.model_card.remote()
        return self._card

    async def _sample(self, job: SampleJob) -> list[tuple[bytes, dict]]:
        """Split into pieces the Generator batches and replicas share; 503 when they are full or down,
        404 for an adapter the replicas have not loaded."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        if job.adapter is not None and job.adapter not in self.args.adapters:
            known = ", ".join(sorted(self.args.adapters)) or "none (the operator passed no --adapter)"
            raise ApiError(404, f"unknown adapter {job.adapter!r}: this server has {known}", "adapter")
        pieces = job.split(self.args.max_batch_size)
        try:
            results = await asyncio.gather(*[self.generator.sample.remote(piece) for piece in pieces])
        except BackPressureError:
            raise ApiError(503, "the model replicas are at capacity (their queues are full): retry in a few "
                                "seconds", headers={"Retry-After": "5"}) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            raise ApiError(503, "a model replica went away while serving this request: retry; the deployment "
                                "is replacing it", headers={"Retry-After": "5"}) from None
        return [made for result in results for made in result]

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(resources.files("emoji_ldm.serve").joinpath("page.html").read_text())

    @api.get("/healthz")
    async def healthz(self) -> dict:
        card = await self._model_card()
        return {"status": "ok", "model": card.get("uri"), "version": __version__}

    @api.get("/v1/model")
    async def model(self) -> dict:
        """The model card: lineage (dataset and latent table versions, code version), config, metrics."""
        card = await self._model_card()
        return {**card, "limits": {"max_batch_size": self.args.max_batch_size, "sets_storage":
                                   bool(self.args.sets_uri)}}

    @api.post("/v1/generate", responses={200: {"content": {"application/json": {}, "image/png": {}},
                                               "description": "base64 PNGs as JSON, or one image/png"}})
    async def generate(self, body: GenerateRequest, request: Request):
        want_png = body.format == "png" or (body.n == 1 and "image/png" in request.headers.get("accept", ""))
        if want_png and body.n != 1:
            raise ApiError(422, "n: format png returns exactly one image; set n to 1 or use format json", "n")
        seeds = tuple(body.seed + i for i in range(body.n))
        job = SampleJob.of((body.prompt,) * body.n, seeds, body.sampler(body.n), body.adapter)
        start = time.perf_counter()
        made = await self._sample(job)
        if want_png:
            return Response(made[0][0], media_type="image/png", headers={"X-Seed": str(seeds[0])})
        card = await self._model_card()
        # `metadata`: per image, the fields its PNG's text chunks hold (inference/pngmeta.py)
        return {"prompt": body.prompt, "seeds": list(seeds), "images": [_b64(png) for png, _ in made],
                "metadata": [params for _, params in made], "model": card.get("uri"),
                "model_content_id": card.get("content_id"), "code_version": made[0][1].get("code_version"),
                "settings": _settings(body), "elapsed_s": round(time.perf_counter() - start, 3)}

    @api.post("/v1/emoji-sets", responses={200: {"content": {"application/zip": {}, "application/json": {}},
                                                 "description": "a zip (PNGs, sheet.png, manifest.json), or JSON"}})
    async def emoji_set(self, body: EmojiSetRequest):
        from emoji_ldm.serve.sets import new_set_id, set_files, set_manifest, store_set, zip_bytes

        if body.store and not self.args.sets_uri:
            raise ApiError(409, "store: this server has no storage for sets (its operator did not set --sets-uri); "
                                "leave store false to download the set", "store")
        prompts = body.prompts()
        # every item starts from the same noise (one seed): the set shares pose, palette and framing
        job = SampleJob.of(tuple(prompts), (body.seed,) * len(prompts), body.sampler(), body.adapter)
        made = await self._sample(job)
        pngs, params = [png for png, _ in made], [p for _, p in made]
        set_id = new_set_id()
        card = await self._model_card()
        manifest = set_manifest(set_id, body.theme, body.items, prompts, _settings(body), card, card.get("uri", ""),
                                body.target)
        if body.adapter:  # the LoRA that drew the set: its URI and content id, beside the base model's
            manifest["adapter"] = next((a for a in card.get("adapters", []) if a["name"] == body.adapter), None)
        files = await asyncio.to_thread(set_files, manifest, pngs, params if self.args.png_metadata else None)
        if body.store:
            uris = await asyncio.to_thread(store_set, self.args.sets_uri, set_id, files)
            return {"id": set_id, "uri": uris["manifest.json"].rsplit("/", 1)[0], "files": uris, "manifest": manifest}
        if body.format == "json":
            return {"id": set_id, "manifest": manifest, "images": [_b64(files[i["file"]]) for i in manifest["items"]]}
        return Response(zip_bytes(files, set_id), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{set_id}.zip"'})


    # --- durable jobs (serve/durable.py) ------------------------------------------------------------

    def _owner(self, request: Request):
        """(owner name, its key or None): jobs live under the caller's key name."""
        from emoji_ldm.serve.durable import ANONYMOUS

        key = request.scope.get("state", {}).get("api_key")
        return (key.name if key else ANONYMOUS), key

    def _jobs_on(self) -> None:
        if not self.args.jobs_uri:
            raise ApiError(409, "this server runs no jobs (its operator did not set jobs_uri / --jobs-uri); "
                                "use /v1/emoji-sets, or `emoji-ldm bulk`")

    async def _job_folder(self, request: Request, job_id: str) -> tuple[str, str, dict]:
        """(owner, folder, state) of the caller's job; 404 for another key's job or none."""
        from emoji_ldm.serve.durable import job_folder, read_state

        self._jobs_on()
        owner, _ = self._owner(request)
        if not JOB_ID.fullmatch(job_id):
            raise ApiError(404, f"no job {job_id!r}")
        folder = job_folder(self.args.jobs_uri, owner, job_id)
        state = await asyncio.to_thread(read_state, folder)
        if state is None:
            from emoji_ldm.serve.durable import read_request

            request_json = await asyncio.to_thread(read_request, folder)
            if request_json is None:
                raise ApiError(404, f"no job {job_id!r} for this key")
            state = {"id": job_id, "state": "queued", "done": 0, "total": None, "created_at":
                     request_json["created_at"]}
        return owner, folder, state

    def _job_spec(self, owner: str, key, job_id: str, body: dict, digest: str):
        from emoji_ldm.serve.durable import JobSpec

        device = self.args.device if self.args.device != "auto" else ("cuda" if self.args.job_num_gpus else "cpu")
        secret = key.webhook_secret if key else os.environ.get("EMOJI_LDM_WEBHOOK_SECRET", "")
        return JobSpec(self.args.jobs_uri, owner, job_id, body, digest, self.args.model, self.args.max_batch_size,
                       device, self.args.inference(), self.args.adapters.get(body.get("adapter") or "", ""),
                       self.args.png_metadata, self.args.job_num_cpus, self.args.job_num_gpus, secret,
                       tuple(self.args.webhook_allow))

    @api.post("/v1/jobs", status_code=202)
    async def create_job(self, body: JobRequest, request: Request):
        """Start a set or bulk job; 202 with its id. `Idempotency-Key`: a replay returns the same job, the same
        key with another body is a 409."""
        from emoji_ldm.serve import durable
        from emoji_ldm.serve.webhooks import CallbackRefused, check_callback

        self._jobs_on()
        owner, key = self._owner(request)
        if body.adapter is not None and body.adapter not in self.args.adapters:
            known = ", ".join(sorted(self.args.adapters)) or "none"
            raise ApiError(404, f"unknown adapter {body.adapter!r}: this server has {known}", "adapter")
        data = body.model_dump(mode="json")
        digest = durable.body_hash(data)
        idempotency = request.headers.get("idempotency-key", "").strip()
        if len(idempotency) > 255:
            raise ApiError(400, "Idempotency-Key is longer than 255 characters")
        if idempotency:
            job_id = durable.idempotent_job_id(owner, idempotency)
            known = await asyncio.to_thread(durable.read_request, durable.job_folder(self.args.jobs_uri, owner, job_id))
            if known is not None:
                return await self._same_job(request, owner, job_id, known["body_hash"], digest)
        else:
            job_id = durable.new_job_id()
        if body.callback_url:
            if not (key.webhook_secret if key else os.environ.get("EMOJI_LDM_WEBHOOK_SECRET")):
                raise ApiError(422, "callback_url: this server has no webhook secret to sign with (no API keys and "
                                    "no EMOJI_LDM_WEBHOOK_SECRET)", "callback_url")
            try:
                await asyncio.to_thread(check_callback, body.callback_url, self.args.webhook_allow)
            except CallbackRefused as e:
                raise ApiError(400, str(e), "callback_url") from None
        quota = key.max_jobs if key else None
        if quota is not None and await asyncio.to_thread(durable.running_jobs, owner) >= quota:
            raise ApiError(429, f"key {owner!r} has {quota} job(s) running, its quota: retry when one ends",
                           headers={"Retry-After": "30"})
        spec = self._job_spec(owner, key, job_id, data, digest)
        actor = await asyncio.to_thread(durable.start_runner, spec)
        stored = await actor.stored_body_hash.remote()
        if idempotency:
            return await self._same_job(request, owner, job_id, stored, digest, created=True)
        return JSONResponse(durable.public_state({"id": job_id, "state": "queued", "total": body.images(),
                                               "created_at": durable.now_iso()}), status_code=202,
                            headers={"Location": f"/v1/jobs/{job_id}"})

    async def _same_job(self, request: Request, owner: str, job_id: str, stored: str, digest: str,
                        created: bool = False):
        from emoji_ldm.serve import durable

        if stored != digest:
            raise ApiError(409, "Idempotency-Key was used with a different body: send the same body to get its "
                                "job, or use a new key for a new job")
        _, _, state = await self._job_folder(request, job_id)
        return JSONResponse(durable.public_state(state), status_code=202,
                            headers={"Location": f"/v1/jobs/{job_id}", **({} if created else
                                                                          {"Idempotent-Replayed": "true"})})

    @api.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request) -> dict:
        """State, progress (done/total), errors and, when it has ended, links to the zip and manifest."""
        from emoji_ldm.serve import durable

        owner, folder, state = await self._job_folder(request, job_id)
        if state["state"] not in durable.ENDED and await asyncio.to_thread(durable.runner, owner, job_id) is None:
            # no runner: it has just ended (it writes its last state, then exits), or it is gone (a node or the
            # whole cluster restarted) and a new one resumes after the last chunk
            _, _, state = await self._job_folder(request, job_id)
            if state["state"] not in durable.ENDED:
                known = await asyncio.to_thread(durable.read_request, folder)
                _, key = self._owner(request)
                spec = self._job_spec(owner, key, job_id, known["body"], known["body_hash"])
                await asyncio.to_thread(durable.start_runner, spec)
        return durable.public_state(state)

    @api.delete("/v1/jobs/{job_id}", status_code=202)
    async def cancel_job(self, job_id: str, request: Request) -> dict:
        """Cancel: the runner stops after its current chunk; what it drew is packaged and marked partial."""
        from emoji_ldm.serve import durable
        from emoji_ldm.store.artifacts import write_bytes
        from emoji_ldm.store.uri import join

        owner, folder, state = await self._job_folder(request, job_id)
        if state["state"] in durable.ENDED:
            return durable.public_state(state)
        await asyncio.to_thread(write_bytes, join(folder, "cancel"), b"")  # a runner that starts later sees it
        actor = await asyncio.to_thread(durable.runner, owner, job_id)
        if actor is not None:
            await actor.cancel.remote()
        return {**durable.public_state(state), "state": "cancelling"}

    @api.get("/v1/jobs/{job_id}/result.zip", response_class=Response,
             responses={200: {"content": {"application/zip": {}}}})
    async def job_zip(self, job_id: str, request: Request):
        _, _, state = await self._job_folder(request, job_id)
        return self._result_file(state, "zip", "application/zip",
                                 {"Content-Disposition": f'attachment; filename="{job_id}.zip"'})

    @api.get("/v1/jobs/{job_id}/manifest.json", response_class=Response)
    async def job_manifest(self, job_id: str, request: Request):
        _, _, state = await self._job_folder(request, job_id)
        return self._result_file(state, "manifest", "application/json")

    def _result_file(self, state: dict, which: str, media_type: str, headers: dict | None = None):
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


# --- building the application ------------------------------------------------------------


def application(args: dict, deployments: list[dict] | None = None) -> serve.Application:
    """The bound application; `deployments` are the Serve config's per-deployment options."""
    config = AppArgs(**args)
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments or []}
    generator = Generator.options(**options.get("Generator", {})).bind(
        config.model, config.max_batch_size, config.batch_wait_timeout_s, config.device, config.torch_threads,
        config.png_metadata, config.inference(), config.adapters)
    return Ingress.options(**options.get("Ingress", {})).bind(generator, asdict(config))


def build_app(args: dict) -> serve.Application:
    """Application builder for `import_path: emoji_ldm.serve.app:build_app` (Serve applies the options)."""
    return application(args)
