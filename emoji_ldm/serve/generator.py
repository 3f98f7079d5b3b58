"""The model deployment: one diffusers pipeline per replica; `@serve.batch` packs concurrent requests
into one batch, counted in images, not requests, drawn in pipeline calls of at most max_batch_size images and
max_batch_pixels pixels (images x size^2), so a batch of large images stays within the GPU's memory. Autoscaled
by ongoing requests (`serve_config.yaml`)."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from ray import serve  # noqa: TID253 (a Serve deployment is decorated at import)

from emoji_ldm.inference.sampler import SampleJob
from emoji_ldm.runtime.heap import release_free_heap
from emoji_ldm.serve.schemas import MAX_BATCH_PIXELS, images_per_call

logger = logging.getLogger("ray.serve")


def images_in(jobs: list[SampleJob]) -> int:
    """Batch size in images, not requests (`@serve.batch` batch_size_fn)."""
    return sum(len(job.prompts) for job in jobs)


@serve.deployment(name="Generator")
class Generator:
    """One pipeline per replica; concurrent requests share pipeline calls."""

    def __init__(self, model: str, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.05,
                 device: str = "auto", torch_threads: int = 0, png_metadata: bool = True, inference=None,
                 adapters: dict | None = None, max_batch_pixels: int = MAX_BATCH_PIXELS):
        import torch

        from emoji_ldm.inference.sampler import model_card

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # Every torch call of this replica runs on this one thread. With OpenMP, each thread that
        # runs torch ops gets its own team of workers, and an idle team keeps spinning on the cores,
        # which slows the UNet down when threads alternate (asyncio.to_thread's pool).
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self.sampler = self._torch_thread.submit(self._load, model, device, torch_threads, inference).result()
        for name, uri in (adapters or {}).items():  # LoRA adapters on this one base, chosen per request
            self._torch_thread.submit(self.sampler.load_adapter, name, uri).result()
        self.max_batch_size, self.max_batch_pixels = max_batch_size, max_batch_pixels
        self.warmup_s = None
        if inference is not None and inference.compile:
            # __init__ returns (and the replica, hence /healthz, is ready) only once the compiled UNet has run
            # at batch 1 and at the largest batch: the first request does not pay the compile
            largest = self._per_call(self.sampler.image_size)
            self.warmup_s = self._torch_thread.submit(self.sampler.warm_up, (1, largest)).result()
            logger.info("Generator: compiled UNet warmed up in %.1f s", self.warmup_s)
        self.card = model_card(model)
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
        """(PNG bytes, generation parameters) per image of one job (at most max_batch_size images). An animated
        job's images are loops of many frames each (a lossless APNG per image, `animation.drawn_loop`): drawn
        on their own, in calls of at most max_batch_size frames (and max_batch_pixels pixels), not packed with
        other requests (one loop can be more frames than a batch holds)."""
        self.requests += 1
        if job.animation is not None:
            return await asyncio.get_running_loop().run_in_executor(self._torch_thread, self._animate, job)
        return await self._batch(job)

    def _per_call(self, size: int | None) -> int:
        """Images of `size` px (None: the model's) one pipeline call draws: max_batch_size, fewer when they would
        be more than max_batch_pixels (a batch of large images would not fit the GPU's memory)."""
        return images_per_call(size or self.sampler.image_size, self.max_batch_size, self.max_batch_pixels)

    def _animate(self, job: SampleJob) -> list[tuple[bytes, dict]]:
        frames = len(job.prompts) * job.animation.frames
        step = self._per_call(job.size)
        self.images += frames
        self.batch_sizes = (self.batch_sizes + [min(frames, step)])[-1000:]
        (made,) = self.sampler.pngs([job], metadata=self.png_metadata, max_batch=step)
        release_free_heap()
        return made

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=images_in)
    async def _batch(self, jobs: list[SampleJob]) -> list[list[tuple[bytes, dict]]]:
        # off the event loop, so the replica keeps accepting (and queueing) requests meanwhile
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, self._sample_pngs, jobs)

    def _sample_pngs(self, jobs: list[SampleJob]) -> list[list[tuple[bytes, dict]]]:
        size = images_in(jobs)
        self.images += size
        self.batch_sizes = (self.batch_sizes + [size])[-1000:]
        made: list = [None] * len(jobs)
        by_size: dict[int | None, list[int]] = {}
        for i, job in enumerate(jobs):  # one image size per pipeline call, its calls under max_batch_pixels
            by_size.setdefault(job.size, []).append(i)
        for size, members in by_size.items():
            drawn = self.sampler.pngs([jobs[i] for i in members], metadata=self.png_metadata,
                                      max_batch=self._per_call(size))
            for i, pngs in zip(members, drawn):
                made[i] = pngs
        release_free_heap()  # a replica lives for days: the call's freed activations go back to the OS
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
