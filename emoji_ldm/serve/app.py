"""The Serve application: a FastAPI ingress in front of a batched, autoscaled model deployment.

    HTTP ──► Ingress (FastAPI: validation, web page, zips, set storage, /v1/jobs)
                │  DeploymentHandle, requests split into pieces of <= max_batch_size images
                ▼
             Generator (serve/generator.py: one diffusers pipeline per replica; @serve.batch packs
                        concurrent requests into one pipeline call; autoscaled by ongoing requests)

Input: a model folder/URI (a diffusers pipeline with model_card.json, local or
S3). Output: PNGs over HTTP; emoji sets as zips, or stored under the
operator's `sets_uri`. Entry points: `build_app` (the `import_path` of
`serve_config.yaml`, used by `serve run`, `serve deploy` and the RayService)
and `application` (the same with deployment options, used by `emoji-ldm serve`).

Each Ingress replica builds its own FastAPI app (`__serve_build_asgi_app__`, Serve's late-bound
ingress): the HTTP plumbing from serve/http.py, the model routes here, the jobs routes from
serve/job_routes.py.

Replica options (autoscaling, max_ongoing_requests, max_queued_requests, CPUs
and GPUs) live in `serve_config.yaml`, not here: one file for every way of
deploying.
"""

import asyncio
import base64
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from emoji_ldm import __version__
from emoji_ldm.inference.sampler import SampleJob
from emoji_ldm.serve.errors import ApiError
from emoji_ldm.serve.generator import Generator
from emoji_ldm.serve.http import new_api, page_headers
from emoji_ldm.serve.jobs.routes import JobRoutes
from emoji_ldm.serve.limits import check_adapter, check_pixels
from emoji_ldm.serve.placement import check_gpu_share
from emoji_ldm.serve.schemas import MAX_BATCH_PIXELS, EmojiSetRequest, GenerateRequest, images_per_call
from emoji_ldm.serve.sets import finish_files, media_type


@dataclass(frozen=True)
class AppArgs:
    """The application's `args:` in the Serve config (or `emoji-ldm serve` flags)."""

    model: str
    sets_uri: str = ""               # where `"store": true` sets go; empty: storing is off
    max_batch_size: int = 16         # images per pipeline call
    max_batch_pixels: int = MAX_BATCH_PIXELS  # and pixels (images x size^2) per call, on a replica or a job's drawer
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
    job_num_cpus: float = 1.0        # each job's drawer actor (serve/durable.py): CPUs ...
    job_num_gpus: float = 0.0        # ... and GPUs (> 0: it draws on CUDA; a share below 1 fits beside a replica)
    job_slots: int = 0               # jobs drawing at once, cluster-wide (serve/jobs/queue.py); 0: as many drawers as
                                     # the cluster's CPUs/GPUs hold when the first job comes
    webhook_allow: tuple = ()        # CIDRs a job's callback_url may reach besides public addresses
    judge: str = ""                  # an emoji judge (train-judge --out): sets' legibility and consistency; empty: none
    insecure: bool = False           # no keys and no Host check: anyone who reaches the port may generate
    sweep_s: float = 60.0            # how often an ingress resumes orphaned jobs and cancels revoked keys' jobs
    retention_days: float = 7.0      # job folders and stored sets older than this are deleted (0: kept forever)

    def __post_init__(self):
        from emoji_ldm.errors import UserError
        from emoji_ldm.serve.strict import parse_fields

        parse_fields(self)  # "false" is false, "16" is 16; "no" or 16.5 for an int is refused (serve/strict.py)
        if not self.model:
            raise UserError("args.model is empty: give the model folder/URI to serve")
        for name, uri in self.adapters.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", str(name)) or not uri:
                raise UserError(f"args.adapters: {name!r}={uri!r}: a name of letters, digits, '-', '_' or '.' "
                                "(at most 64) and a LoRA folder/URI")
        if not 1 <= self.max_batch_size <= 256:
            raise UserError(f"args.max_batch_size must be from 1 to 256, got {self.max_batch_size}")
        if self.max_batch_pixels < 16 * 16:
            raise UserError(f"args.max_batch_pixels must hold one 16 px image (256 pixels) or more, got "
                            f"{self.max_batch_pixels}")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise UserError(f"args.batch_wait_timeout_s must be from 0 to 10 seconds, got {self.batch_wait_timeout_s}")
        if self.torch_threads < 0:
            raise UserError(f"args.torch_threads must be 0 (Ray's default) or more, got {self.torch_threads}")
        if self.sweep_s <= 0 or self.retention_days < 0:
            raise UserError(f"args.sweep_s must be more than 0 seconds and args.retention_days 0 or more, got "
                            f"{self.sweep_s} / {self.retention_days}")
        if self.job_slots < 0:
            raise UserError(f"args.job_slots must be 0 (as many as the cluster holds) or more, got {self.job_slots}")
        if self.job_num_cpus < 0 or self.job_num_gpus < 0:
            raise UserError(f"args.job_num_cpus / job_num_gpus must be 0 or more, got {self.job_num_cpus} / "
                            f"{self.job_num_gpus}")
        check_gpu_share("args.job_num_gpus", self.job_num_gpus)
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
        from emoji_ldm.serve.jobs.retention import check_locations

        check_locations(self.sets_uri, self.jobs_uri, {"model": self.model, "judge": self.judge, "keys": self.keys,
                                                       **{f"adapter {n}": u for n, u in self.adapters.items()}})

    def inference(self):
        from emoji_ldm.errors import UserError
        from emoji_ldm.inference.sampler import InferenceOptions

        try:
            return InferenceOptions(dtype=self.dtype, channels_last=self.channels_last, compile=self.compile)
        except UserError as e:
            raise UserError(f"args.{e}") from None


def _settings(body) -> dict:
    return body.model_dump(include={"negative_prompt", "steps", "guidance", "seed", "scheduler", "size", "adapter"})


async def _shared_spend(bucket: str, cost: float, per_minute: float) -> float:
    """`Meter.spend` on the meter actor that every ingress replica shares."""
    from emoji_ldm.serve.meter import ask

    return await ask("spend", bucket, cost, per_minute)


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """Validation, the web page, zips and set storage in front of the Generator; the /v1/jobs routes."""

    def __init__(self, generator: DeploymentHandle, args: dict):
        from emoji_ldm.serve.keys import KeyRing

        self.generator = generator
        self.args = AppArgs(**args)
        self._card: dict | None = None
        # each key's request rate from the meter actor every replica asks, as its cost budget (serve/meter.py)
        self.keyring = KeyRing(self.args.keys, spend=_shared_spend) if self.args.keys else None
        self.jobs = JobRoutes(self.args, self.keyring, self._model_card)
        if self.args.jobs_uri or (self.args.sets_uri and self.args.retention_days):
            # on start and every sweep_s: resume orphaned jobs, cancel revoked keys' jobs, expire old results
            threading.Thread(target=self.jobs.sweep_forever, name="sweep-jobs", daemon=True).start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """This replica's app, built after __init__: with keys, every route but the public ones needs one
        (serve/http.py, whatever the route_prefix); without keys and not `insecure`, only localhost Hosts."""
        api = new_api(self.keyring, local_only=self.keyring is None and not self.args.insecure)
        api.get("/", response_class=HTMLResponse, include_in_schema=False)(self.page)
        api.get("/healthz")(self.healthz)
        api.get("/v1/model")(self.model)
        api.post("/v1/generate", responses={200: {"content": {"application/json": {}, "image/png": {}},
                                                  "description": "base64 PNGs as JSON, or one image/png"}}
                 )(self.generate)
        api.post("/v1/emoji-sets", responses={200: {"content": {"application/zip": {}, "application/json": {}},
                                                    "description": "a zip (PNGs, sheet.png, manifest.json), or JSON"}}
                 )(self.emoji_set)
        api.post("/v1/verify", responses={200: {"content": {"application/json": {}},
                                                "description": "the C2PA verification of the emoji in the body"}}
                 )(self.verify)
        self.jobs.add_to(api)
        return api

    async def _model_card(self) -> dict:
        if self._card is None:
            self._card = await self.generator.model_card.remote()
        return self._card

    async def _sample(self, job: SampleJob) -> list[tuple[bytes, dict]]:
        """Split into pieces the Generator batches and replicas share; 503 when they are full or down,
        404 for an adapter the replicas have not loaded."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        check_adapter(job.adapter, self.args.adapters)
        size = job.size or (await self._model_card()).get("image_size") or 0
        pieces = job.split(images_per_call(size, self.args.max_batch_size, self.args.max_batch_pixels) if size else
                           self.args.max_batch_size)
        try:
            results = await asyncio.gather(*[self.generator.sample.remote(piece) for piece in pieces])
        except BackPressureError:
            raise ApiError(503, "the model replicas are at capacity (their queues are full): retry in a few "
                                "seconds", headers={"Retry-After": "5"}) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            raise ApiError(503, "a model replica went away while serving this request: retry; the deployment "
                                "is replacing it", headers={"Retry-After": "5"}) from None
        return [made for result in results for made in result]

    async def page(self) -> HTMLResponse:
        html = resources.files("emoji_ldm.serve").joinpath("page.html").read_text()
        return HTMLResponse(html, headers=page_headers(html))  # CSP, no framing (serve/http.py)

    async def healthz(self) -> dict:
        """Open to anyone, so it says only that the model is loaded; /v1/model (with a key) says which."""
        await self._model_card()
        return {"status": "ok"}

    async def _charge(self, request: Request, images: int, steps: int, size: int | None) -> None:
        """The pixel budgets, per request and per pipeline call, at the size asked or else the model's own, then the
        key's cost (serve/meter.py): 422 / 429 before any model work."""
        from emoji_ldm.serve.meter import ask, cost_units

        drawn = size or (await self._model_card()).get("image_size")
        if drawn:
            check_pixels(images, drawn, self.args.max_batch_pixels, own_size=not size)
        key = request.scope.get("state", {}).get("api_key")
        if key is None:
            return
        cost = cost_units(images, steps, drawn)  # a request that leaves out the size pays for the model's own
        # more than a whole minute's budget never fits: refused here, without asking the meter
        wait = -1.0 if cost > key.cost_per_minute else await ask("spend", key.owner, cost, key.cost_per_minute,
                                                                  key.budget)
        if wait < 0:
            raise ApiError(429, f"this request costs {cost:g} units (images x steps x (size/64)^2), more than key "
                                f"{key.name!r} may spend in a minute ({key.cost_per_minute}): ask for fewer "
                                "images or steps, or send a job")
        if wait > 0:  # its minute bucket, or the budget it shares with the key's jobs (serve/meter.py)
            raise ApiError(429, f"key {key.name!r} has spent its {key.cost_per_minute} cost units a minute or its "
                                f"budget of {key.budget}: this "
                                f"request ({cost:g} units) fits in {wait:.0f} s", headers={"Retry-After":
                                                                                          str(int(wait + 0.999))})

    async def model(self) -> dict:
        """The model card: lineage (dataset and latent table versions, code version), config, metrics."""
        card = await self._model_card()
        return {**card, "version": __version__, "limits": {"max_batch_size": self.args.max_batch_size,
                                                           "max_batch_pixels": self.args.max_batch_pixels,
                                                           "sets_storage": bool(self.args.sets_uri)}}

    async def generate(self, body: GenerateRequest, request: Request):
        want_png = body.format == "png" or (body.n == 1 and "image/png" in request.headers.get("accept", ""))
        if want_png and body.n != 1:
            raise ApiError(422, "n: format png returns exactly one image; set n to 1 or use format json", "n")
        await self._charge(request, body.n * max(1, body.animation.frames), body.steps, body.size)  # a loop: frames
        seeds = tuple(body.seed + i for i in range(body.n))
        job = SampleJob.of((body.prompt,) * body.n, seeds, body.sampler(body.n), body.adapter,
                           body.animation.settings())
        start = time.perf_counter()
        made = await self._sample(job)
        # the target's size and cap; an animated loop as its format (serve/sets.py)
        made = await asyncio.to_thread(finish_files, made, body, self.args.png_metadata)
        if want_png:
            return Response(made[0][0], media_type=media_type(made[0][1]), headers={"X-Seed": str(seeds[0])})
        card = await self._model_card()
        # `metadata`: per image, the fields its PNG's text chunks hold (inference/pngmeta.py)
        return {"prompt": body.prompt, "seeds": list(seeds), "images": [_b64(png) for png, _ in made],
                "metadata": [params for _, params in made], "model": card.get("uri"),
                "model_content_id": card.get("content_id"), "code_version": made[0][1].get("code_version"),
                "settings": _settings(body), "elapsed_s": round(time.perf_counter() - start, 3)}

    async def verify(self, request: Request):
        """The C2PA verification (inference/provenance.py `verify`) of the emoji file that is the body (PNG, APNG,
        GIF or WebP); `X-C2PA-Sidecar`: its .c2pa manifest store, base64, for a file whose manifest is a sidecar."""
        import binascii

        from emoji_ldm.errors import UserError
        from emoji_ldm.inference.provenance import verify

        data = await request.body()
        if not data:
            raise ApiError(422, "the body is empty: POST the bytes of an emoji file (PNG, APNG, GIF or WebP)", "body")
        sidecar = request.headers.get("x-c2pa-sidecar")
        try:
            sidecar = base64.b64decode(sidecar, validate=True) if sidecar else None
        except binascii.Error:
            raise ApiError(422, "X-C2PA-Sidecar is not base64: send the .c2pa file base64-encoded",
                           "X-C2PA-Sidecar") from None
        try:
            return await asyncio.to_thread(verify, data, sidecar, None, "the body")
        except UserError as e:
            raise ApiError(422, str(e), "body") from None

    async def emoji_set(self, body: EmojiSetRequest, request: Request):
        from emoji_ldm.serve.sets import draw_set, new_set_id, set_files, set_manifest, store_set, zip_bytes

        if body.store and not self.args.sets_uri:
            raise ApiError(409, "store: this server has no storage for sets (its operator did not set --sets-uri); "
                                "leave store false to download the set", "store")
        prompts = body.prompts()
        frames = max(1, body.animation.frames)
        await self._charge(request, len(prompts) * frames, body.steps, body.size)
        # every item starts from the same noise (one seed): the set shares pose, palette and framing
        job = SampleJob.of(tuple(prompts), (body.seed,) * len(prompts), body.sampler(), body.adapter,
                           body.animation.settings())

        async def redraw(again: SampleJob):  # charged as a request for its images: redraws come out of the budget
            await self._charge(request, len(again.prompts) * frames, body.steps, body.size)
            return await self._sample(again)

        # with the server's judge: legibility and consistency measured, items redrawn (serve/sets.py)
        made, quality = await draw_set(self._sample, job, body, self.args.judge, redraw)
        pngs, params = [png for png, _ in made], [p for _, p in made]
        set_id = new_set_id()
        card = await self._model_card()
        manifest = set_manifest(set_id, body.theme, body.items, prompts, _settings(body), card, card.get("uri", ""),
                                body.target, body.animation.settings(), quality)
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


# --- building the application ------------------------------------------------------------


def application(args: dict, deployments: list[dict] | None = None) -> serve.Application:
    """The bound application; `deployments` are the Serve config's per-deployment options."""
    from emoji_ldm.serve.strict import unknown

    unknown(args, AppArgs)
    config = AppArgs(**args)
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments or []}
    generator = Generator.options(**options.get("Generator", {})).bind(
        config.model, config.max_batch_size, config.batch_wait_timeout_s, config.device, config.torch_threads,
        config.png_metadata, config.inference(), config.adapters, config.max_batch_pixels)
    return Ingress.options(**options.get("Ingress", {})).bind(generator, asdict(config))


def build_app(args: dict) -> serve.Application:
    """Application builder for `import_path: emoji_ldm.serve.app:build_app` (`serve run`, `serve deploy`, the
    RayService; Serve applies the options). It refuses to build without API keys (`args.keys`, or
    $EMOJI_LDM_API_KEYS) unless `args.insecure` is true: those paths listen where the Serve config says
    (the packaged one: 0.0.0.0), and `emoji-ldm serve`'s loopback check does not run there."""
    import os

    from emoji_ldm.errors import UserError
    from emoji_ldm.serve.strict import parse, unknown

    args = dict(args)
    unknown(args, AppArgs)
    if not args.get("keys") and os.environ.get("EMOJI_LDM_API_KEYS"):
        args["keys"] = os.environ["EMOJI_LDM_API_KEYS"]
    # parsed here, before the check: the string "false" from `serve run ... insecure=false` is false
    if not parse("keys", str, args.get("keys", "")) and not parse("insecure", bool, args.get("insecure", False)):
        raise UserError("refusing to serve without API keys: set args.keys to a key file (emoji-ldm keys create) "
                        "or $EMOJI_LDM_API_KEYS, or args.insecure: true to let anyone who reaches the port generate")
    return application(args)
