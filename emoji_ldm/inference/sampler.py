"""The sampler: a trained model folder (a standard diffusers StableDiffusionPipeline) loaded once, drawing batches.

Public entry points: `Sampler` (a loaded pipeline that batches `SampleJob`s; generate, the service, bulk,
eval and training's validation grids use it), `load_pipeline`, `model_uri` / `model_folder` / `model_card`
(the model-folder lookup), `run_pipeline`, `png_bytes`, `image_grid`. Every PNG carries its generation
parameters and the model's URI and content id as text chunks (`pngmeta.py`), unless turned off.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from PIL import Image

from emoji_ldm.config import check_choice, opt
from emoji_ldm.errors import UserError
from emoji_ldm.inference.compile import COMPILE_MODES, compile_kwargs, require_compiler

# the images' alpha, PNG bytes and contact sheets: imported from here too (they began here)
from emoji_ldm.inference.images import ImageAlpha, image_grid, png_bytes, to_rgba  # noqa: F401
from emoji_ldm.inference.prompts import clean, model_prompt
from emoji_ldm.inference.settings import DEFAULT_GUIDANCE, SamplerSettings, model_guidance

if TYPE_CHECKING:
    from emoji_ldm.inference.animation import AnimationSettings

logger = logging.getLogger(__name__)


def inference_device(use_gpu: bool) -> str:
    """"cuda" for `--gpu` (refused in one line where no CUDA device is visible), else "cpu"."""
    if not use_gpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise UserError("--gpu: no CUDA device is visible here (torch.cuda.is_available() is False); run on a GPU "
                        "node, or drop --gpu to use the CPU")
    return "cuda"


def model_uri(uri: str) -> str:
    """The URI of the folder holding `model_index.json`: `uri` itself or `uri/model` (a training output);
    absolute, without credentials: what PNGs and sets record as their model."""
    from emoji_ldm.store.artifacts import exists
    from emoji_ldm.store.uri import join, normalize_uri, public_uri

    uri = normalize_uri(uri)
    if not exists(join(uri, "model_index.json")) and exists(join(uri, "model", "model_index.json")):
        uri = join(uri, "model")
    if not exists(join(uri, "model_index.json")):
        raise UserError(f"no model at {uri!r}: expected a diffusers pipeline folder with model_index.json")
    return public_uri(uri)


def model_folder(uri: str) -> str:
    """A local folder holding `model_index.json`: `uri` itself or `uri/model`, downloaded when on S3."""
    from emoji_ldm.store.artifacts import local_copy

    return local_copy(model_uri(uri))


DTYPES = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class InferenceOptions:
    """How a pipeline runs: its dtype, memory format and compilation (the service's args, bulk's flags).

    The GPU fast path of diffusers' "speed up inference" guide: half precision, SDPA attention (diffusers'
    default with torch 2), channels-last and `torch.compile` of the UNet. `auto` is bf16 on CUDA and fp32 on
    CPU. With fp16 the VAE stays in fp32, because the SD VAE's decoder overflows in fp16 (diffusers'
    `force_upcast`); the latents are cast to it before decoding.
    """

    dtype: str = opt("auto", choices=DTYPES, help="pipeline dtype: auto (bf16 on CUDA, fp32 on CPU) | fp32 | "
                                                  "fp16 (the VAE stays fp32) | bf16")
    channels_last: bool = opt(False, help="the UNet and VAE in channels-last memory format")
    compile: bool = opt(False, help="torch.compile the UNet, warmed up when the model loads")
    compile_mode: str = opt("default", choices=COMPILE_MODES, help="torch.compile mode")

    def __post_init__(self):
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)

    def resolved_dtype(self, device: str) -> str:
        return ("bf16" if str(device).startswith("cuda") else "fp32") if self.dtype == "auto" else self.dtype


def load_pipeline(uri: str, scheduler: str = "dpmpp", device: str = "cpu", options: InferenceOptions | None = None):
    """StableDiffusionPipeline from a model folder/URI, with the chosen sampler, dtype, layout and compile."""
    import torch

    from emoji_ldm.models.builders import load_sd_pipeline, sampling_scheduler

    options = options or InferenceOptions()
    if options.compile:
        require_compiler(torch.device(device).type)  # before the weights load
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[options.resolved_dtype(device)]
    folder = model_folder(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a BERT text encoder where CLIP is expected: a type warning only
        pipe = load_sd_pipeline(folder, torch_dtype=dtype)
    pipe.scheduler = sampling_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if dtype == torch.float16:
        pipe.vae.to(torch.float32)  # Sampler decodes the latents itself in the VAE's dtype
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.compile:
        pipe.unet = torch.compile(pipe.unet, **compile_kwargs(options.compile_mode))
    return pipe


def model_card(uri: str) -> dict:
    """The model's `model_card.json` ({} when it has none), read without downloading the weights."""
    from emoji_ldm.store.artifacts import exists, read_json
    from emoji_ldm.store.uri import join

    card = join(model_uri(uri), "model_card.json")
    return read_json(card) if exists(card) else {}


@dataclass(frozen=True)
class SampleJob:
    """The images of one request: image i is `prompts[i]` started from the noise of `seeds[i]`.

    Seeding per image (not per call) makes an image depend only on its own
    prompt, seed and settings, never on which other requests shared its batch.
    """

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    negative_prompt: str = ""
    steps: int = 25
    guidance: float | None = None  # None: the model's own (`Sampler.resolve`)
    scheduler: str | None = "dpmpp"  # None: the pipeline's current scheduler
    size: int | None = None  # pixels; None: the model's own size
    adapter: str | None = None  # a LoRA adapter the Sampler has loaded (`Sampler.load_adapter`); None: the base
    animation: "AnimationSettings | None" = None  # each image an animated loop (`animation.py`); None: stills

    @classmethod
    def of(cls, prompts: tuple[str, ...], seeds: tuple[int, ...], settings: SamplerSettings,
           adapter: str | None = None, animation: "AnimationSettings | None" = None) -> "SampleJob":
        return cls(prompts, seeds, settings.negative_prompt, settings.steps, settings.guidance,
                   settings.scheduler, settings.size, adapter,
                   animation if animation is not None and animation.animated else None)

    def __post_init__(self):
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds")

    @property
    def settings(self) -> tuple:
        """Jobs with equal settings can share one pipeline call (an animated job never shares one: `pngs`)."""
        return (self.steps, self.guidance, self.scheduler, self.size, self.adapter)

    def image_params(self, i: int, width: int, height: int, model: str | None, content_id: str | None,
                     adapter: dict | None = None) -> dict:
        """What made image `i` of this job: the text chunks of its PNG and the service's JSON (`pngmeta`);
        `adapter` ({"name", "uri", "content_id"}) when a LoRA adapter drew it."""
        from emoji_ldm.inference.pngmeta import generation_params

        params = generation_params(prompt=self.prompts[i], seed=self.seeds[i], negative_prompt=self.negative_prompt,
                                   steps=self.steps, guidance=self.guidance, scheduler=self.scheduler, width=width,
                                   height=height, model=model, model_content_id=content_id)
        if adapter:
            params.update({"adapter": adapter["name"], "adapter_uri": adapter["uri"],
                           "adapter_content_id": adapter["content_id"]})
        return params

    def split(self, size: int) -> list["SampleJob"]:
        """Pieces of at most `size` images (a batch never exceeds the server's max batch size)."""
        from dataclasses import replace

        return [replace(self, prompts=self.prompts[i:i + size], seeds=self.seeds[i:i + size])
                for i in range(0, len(self.prompts), size)]


class Sampler:
    """A loaded pipeline that samples many jobs in as few pipeline calls as their settings allow.

    `model_uri` and `content_id` (from the model card) name the model in the PNGs it encodes. Every image
    comes out RGBA, as `alpha` (from the card's `image`) says: see `ImageAlpha`. A job that sets no guidance is
    drawn at `guidance`, the card's (`settings.model_guidance`), and its PNGs record that value.
    """

    def __init__(self, pipe, model_uri: str | None = None, content_id: str | None = None,
                 alpha: "ImageAlpha | None" = None, prompt_style: str = "as-typed",
                 guidance: float = DEFAULT_GUIDANCE):
        from emoji_ldm.models.builders import SCHEDULERS, sampling_scheduler

        self.pipe = pipe
        # `sample` says once per call which prompts are truncated; the pipeline's own warning repeats it for every
        # prompt of a batch (a screenful for an eval's hundreds)
        logging.getLogger(type(pipe).__module__).setLevel(logging.ERROR)
        self.model_uri, self.content_id, self.alpha = model_uri, content_id, alpha or ImageAlpha()
        self.prompt_style = prompt_style  # the card's: how a typed prompt reaches the model (inference/prompts.py)
        self.guidance = guidance  # the card's: what a job without a guidance of its own is drawn at
        self._schedulers = {name: sampling_scheduler(name, pipe.scheduler.config) for name in SCHEDULERS}
        self.image_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.calls = 0  # pipeline calls so far (the batching tests count them)
        self.adapters: dict[str, dict] = {}  # name -> {"name", "uri", "content_id", "instance_prompt"}

    @classmethod
    def load(cls, uri: str, device: str = "cpu", options: InferenceOptions | None = None) -> "Sampler":
        resolved = model_uri(uri)
        card = model_card(resolved)
        return cls(load_pipeline(resolved, device=device, options=options), resolved, card.get("content_id"),
                   ImageAlpha.of(card), card.get("prompt_style", "as-typed"), model_guidance(card))

    def resolve(self, job: SampleJob) -> SampleJob:
        """`job` with the model's guidance where it sets none: what it is drawn at and what its PNGs record."""
        return job if job.guidance is not None else replace(job, guidance=self.guidance)

    def load_adapter(self, name: str, uri: str) -> dict:
        """Load a LoRA adapter (`dreambooth --method lora`'s OUT/lora, diffusers/peft format) under `name`,
        on top of the loaded base; jobs choose it by name. Refuses an adapter trained on other base weights."""
        from emoji_ldm.store.artifacts import exists, local_copy, read_json
        from emoji_ldm.store.uri import join, normalize_uri, public_uri

        uri = normalize_uri(uri)
        if not exists(join(uri, "pytorch_lora_weights.safetensors")) and exists(
                join(uri, "lora", "pytorch_lora_weights.safetensors")):
            uri = join(uri, "lora")  # a dreambooth --out
        if not exists(join(uri, "pytorch_lora_weights.safetensors")):
            raise UserError(f"adapter {name!r}: no LoRA weights at {uri!r} (expected pytorch_lora_weights."
                            "safetensors, as `emoji-ldm dreambooth --method lora` writes under OUT/lora)")
        card = read_json(join(uri, "model_card.json")) if exists(join(uri, "model_card.json")) else {}
        base = card.get("base_content_id")
        if base and self.content_id and base != self.content_id:
            raise UserError(f"adapter {name!r} ({uri}) was trained on the base {base[:19]}, not on the served model "
                            f"{self.content_id[:19]}: serve it on top of its own base")
        self.pipe.load_lora_weights(local_copy(uri), adapter_name=name)
        self.pipe.disable_lora()  # the base draws unless a job names the adapter
        self.adapters[name] = {"name": name, "uri": public_uri(uri), "content_id": card.get("content_id"),
                               "instance_prompt": card.get("instance_prompt")}
        return self.adapters[name]

    def _activate(self, adapter: str | None) -> None:
        if not self.adapters:
            return
        if adapter is None:
            self.pipe.disable_lora()
            return
        if adapter not in self.adapters:
            raise UserError(f"unknown adapter {adapter!r}: loaded are {', '.join(sorted(self.adapters))}")
        self.pipe.enable_lora()
        self.pipe.set_adapters([adapter])

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,), steps: int = 2) -> float:
        """Sample once at each batch size (a compiled UNet compiles for them now, not on the first request);
        returns the seconds it took."""
        import time

        start = time.perf_counter()
        for n in sorted(set(batch_sizes)):
            self._call([SampleJob(("warm-up",) * n, tuple(range(n)), "", steps, self.guidance, scheduler=None)])
        self.calls = 0
        return time.perf_counter() - start

    def pngs(self, jobs: list[SampleJob], metadata: bool = True,
             max_batch: int | None = None) -> list[list[tuple[bytes, dict]]]:
        """Per job, (PNG bytes, its generation parameters) per image; the PNGs carry the parameters as
        text chunks unless `metadata` is False. `max_batch`: see `sample`. An animated job's images are its loops,
        each a lossless APNG of all its frames at the size drawn (`animation.drawn_loop`)."""
        from emoji_ldm.inference.animation import drawn_loop

        jobs = [self.resolve(job) for job in jobs]
        out = []
        stills = [job for job in jobs if job.animation is None]
        drawn = iter(self.sample(stills, max_batch))
        for job in jobs:
            if job.animation is not None:
                out.append([drawn_loop(frames, job, i, self, metadata)
                            for i, frames in enumerate(self.animate(job, job.animation, max_batch))])
                continue
            images = next(drawn)
            adapter = self.adapters.get(job.adapter) if job.adapter else None
            params = [job.image_params(i, im.width, im.height, self.model_uri, self.content_id, adapter)
                      for i, im in enumerate(images)]
            out.append([(png_bytes(im, p if metadata else None), p) for im, p in zip(images, params)])
        return out

    def latent_shape(self, size: int | None = None) -> tuple[int, int, int, int]:
        """(1, C, H/8, W/8): one image's latent at `size` pixels (default: the model's own)."""
        s = (size or self.image_size) // self.pipe.vae_scale_factor
        return (1, self.pipe.unet.config.in_channels, s, s)

    def noise(self, seed: int, size: int | None = None):
        """The initial latent for `seed`: (1, C, H/8, W/8), drawn on the CPU so every device agrees."""
        import torch

        return torch.randn(self.latent_shape(size), generator=torch.Generator("cpu").manual_seed(seed))

    def sample(self, jobs: list[SampleJob], max_batch: int | None = None) -> list[list[Image.Image]]:
        """Images per job, in order; one pipeline call per distinct (steps, guidance, scheduler), split into calls of
        at most `max_batch` images (a job larger than that spans several calls). An image depends only on its own
        prompt, seed and settings, so the split changes no image."""
        jobs = [self.resolve(job) for job in jobs]
        out: list[list[Image.Image]] = [[] for _ in jobs]
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.settings, []).append(i)
        for members in groups.values():
            pieces = []  # (job index, a slice of that job of at most max_batch images), in order
            for i in members:
                job, step = jobs[i], max_batch or max(1, len(jobs[i].prompts))
                pieces += [(i, replace(job, prompts=job.prompts[a:a + step], seeds=job.seeds[a:a + step]))
                           for a in range(0, len(job.prompts), step)]
            while pieces:
                call = [pieces.pop(0)]
                while pieces and (not max_batch or
                                  sum(len(p.prompts) for _, p in call) + len(pieces[0][1].prompts) <= max_batch):
                    call.append(pieces.pop(0))
                images = self._call([p for _, p in call])
                for i, p in call:
                    out[i].extend(images[:len(p.prompts)])
                    images = images[len(p.prompts):]
        return out

    def animate(self, job: SampleJob, animation, max_batch: int | None = None) -> list[list[Image.Image]]:
        """Per image of `job` (its prompt and seed), the frames of a seamless loop (`animation.loop_noise`:
        noise on a small closed circle around the seed's own noise), in calls of at most `max_batch` frames."""
        from emoji_ldm.inference.animation import loop_noise

        animation.check_scheduler(job.scheduler)
        job = self.resolve(job)
        n, size = animation.frames, job.size or self.image_size
        out = []
        for prompt, seed in zip(job.prompts, job.seeds):
            latents = loop_noise(self.latent_shape(size), seed, n, animation.motion)  # (N, C, h, w)
            step, frames = max_batch or n, []
            for a in range(0, n, step):
                b = min(n, a + step)
                frames += self._call([replace(job, prompts=(prompt,) * (b - a), seeds=(seed,) * (b - a))],
                                     latents[a:b])
            out.append(frames)
        return out

    def _call(self, jobs: list[SampleJob], latents=None) -> list[Image.Image]:
        """One pipeline call for `jobs` (equal settings); `latents` (B, C, h, w): the starting noise, default
        each image's seed's (`noise`)."""
        import torch

        first = jobs[0]
        prompts = [model_prompt(p, self.prompt_style) for job in jobs for p in job.prompts]
        seeds = [s for job in jobs for s in job.seeds]
        negatives = [clean(job.negative_prompt) for job in jobs for _ in job.prompts]
        limit = self.pipe.tokenizer.model_max_length
        too_long = [p for p in prompts if len(self.pipe.tokenizer(p, verbose=False)["input_ids"]) > limit]
        if too_long:
            logger.warning("%d prompt(s) longer than %d tokens are truncated, e.g. %r", len(too_long), limit,
                           too_long[0][:80])
        if first.scheduler is not None:
            self.pipe.scheduler = self._schedulers[first.scheduler]
        self._activate(first.adapter)  # jobs of one call share their settings, the adapter among them
        size = first.size or self.image_size
        unet_dtype = self.pipe.unet.dtype
        if latents is None:
            latents = torch.cat([self.noise(s, size) for s in seeds])  # (B, C, h, w)
        latents = latents.to(self.pipe.device, unet_dtype)
        own_decode = self.pipe.vae.dtype != unet_dtype  # fp16 UNet, fp32 VAE: decode here, in the VAE's dtype
        # one generator per image: stochastic samplers (ddpm) draw their step noise per image too
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        self.calls += 1
        with torch.no_grad():
            result = self.pipe(prompts, negative_prompt=negatives if any(negatives) else None,
                               num_inference_steps=first.steps, guidance_scale=first.guidance,
                               generator=generators, latents=latents, height=size, width=size,
                               output_type="latent" if own_decode else "pil")
            if own_decode:
                vae = self.pipe.vae
                pixels = vae.decode(result.images.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(pixels, output_type="pil") if own_decode else result.images
        return [to_rgba(im, self.alpha) for im in images]


def run_pipeline(pipe, prompts: list[str], negative: str = "", steps: int = 25, guidance: float = DEFAULT_GUIDANCE,
                 seed: int = 0, alpha: "ImageAlpha | None" = None) -> list[Image.Image]:
    """One batched call with the pipeline's current scheduler; image i uses seed `seed + i`."""
    job = SampleJob(tuple(prompts), tuple(seed + i for i in range(len(prompts))), negative, steps, guidance,
                    scheduler=None)
    return Sampler(pipe, alpha=alpha).sample([job])[0]
