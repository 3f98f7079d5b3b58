"""DreamBooth's data: the instance photos as a dataset version, and the class images the base model draws.

- the instance table: the photos through `dataset build` at OUT/instance (3 to 1,000 accepted), built by the
  CLI (cli/dreambooth.py: train/ imports no dataset stage) and handed to `dreambooth.dreambooth`;
- `class_images`: the class table holds `--num-class-images` rows of this base and class prompt: the missing
  ones are drawn in Ray Data actors (`ClassImageSampler`) and committed as one version;
- `read_images`: a worker's PNG bytes of those two small tables; `TrainingImages`: its micro-batches of them;
- `image_card`: how the trained model gets alpha (the model card's `image`).
"""

from __future__ import annotations

import pyarrow as pa

from emoji_ldm.errors import UserError
from emoji_ldm.runtime.shared import MAX_ENV, max_resources

MIN_INSTANCE, MAX_INSTANCE = 3, 1000
MAX_CLASS_IMAGES = 1000  # each worker holds the class images' PNG bytes in memory

CLASS_SCHEMA = pa.schema([
    ("id", pa.string()),            # sha256 of the PNG
    ("image", pa.binary()),         # RGB PNG at the base model's resolution, with its generation parameters
    ("prompt", pa.string()),        # the class prompt
    ("seed", pa.int64()),
    ("base", pa.string()),          # the base model's content id: rows are reused only for the same weights
    ("base_uri", pa.string()),
    ("steps", pa.int32()),
    ("guidance", pa.float32()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])



def read_images(uri: str, version: int, filter_=None, limit: int | None = None) -> list[bytes]:
    """The PNG bytes of a small table (instance photos, class images): bounded by the config's limits."""
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.uri import DatasetRef

    dataset = open_table(DatasetRef(uri, version=version)).to_pyarrow_dataset()
    scanner = dataset.scanner(columns=["image"], filter=filter_)
    table = scanner.head(limit) if limit else scanner.to_table()
    return table.column("image").to_pylist()


def iter_images(uri: str, version: int, batch_size: int = 16):
    """The PNG bytes of a table, `batch_size` at a time: one batch in memory, not the table."""
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.uri import DatasetRef

    dataset = open_table(DatasetRef(uri, version=version)).to_pyarrow_dataset()
    for batch in dataset.to_batches(columns=["image"], batch_size=batch_size):
        yield from batch.column("image").to_pylist()


def pipeline_image_size(base: str) -> int:
    """The base pipeline's resolution in pixels, from its configs alone (unet sample_size x the VAE's factor)."""
    from emoji_ldm.store.artifacts import read_json
    from emoji_ldm.store.uri import join

    try:
        unet = read_json(join(base, "unet", "config.json"))
        vae = read_json(join(base, "vae", "config.json"))
    except (UserError, OSError, ValueError) as e:
        raise UserError(f"--base {base!r} is not a Stable Diffusion pipeline folder (unet/ and vae/ configs): "
                        f"{e}") from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


class ClassImageSampler:
    """A Ray Data actor: the base pipeline, once per actor; a batch of seeds in, class-image rows out."""

    def __init__(self, base: str, base_id: str, prompt: str, steps: int, guidance: float, device: str):
        from emoji_ldm.inference.sampler import Sampler

        self.sampler = Sampler.load(base, device=device)
        self.base, self.base_id, self.prompt, self.steps, self.guidance = base, base_id, prompt, steps, guidance

    def __call__(self, batch: dict) -> pa.Table:
        import datetime as dt
        import hashlib

        from emoji_ldm.inference.sampler import SampleJob

        seeds = tuple(int(s) for s in batch["seed"])
        job = SampleJob((self.prompt,) * len(seeds), seeds, "", self.steps, self.guidance)
        now = dt.datetime.now(dt.timezone.utc)
        rows = [{"id": hashlib.sha256(png).hexdigest(), "image": png, "prompt": self.prompt, "seed": seed,
                 "base": self.base_id, "base_uri": self.base, "steps": self.steps, "guidance": self.guidance,
                 "created_at": now}
                for seed, (png, _) in zip(seeds, self.sampler.pngs([job])[0])]
        return pa.Table.from_pylist(rows, schema=CLASS_SCHEMA)


def class_actor_count(asked: int, use_gpu: bool, resources: dict | None) -> tuple[int, str | None]:
    """How many class-image actors the cluster can hold at once: one GPU each with --gpu, else one CPU each.
    More than that would leave the pool waiting for ever for actors that never start.

    `resources` is the most the cluster may grow to (`runtime.shared.max_resources`), not what is up now: an
    autoscaling cluster starts with no GPU workers. None (an autoscaler and no declared maximum): not checked."""
    kind = "GPU" if use_gpu else "CPU"
    if resources is None:
        return asked, (f"--class-actors {asked} not checked: the cluster autoscales and "
                       f"${MAX_ENV[kind]} does not say how many {kind}s it may have")
    have = int(resources.get(kind, 0))
    if have < 1:
        raise UserError("--gpu: the Ray cluster has no GPUs for the class-image actors; run on a GPU cluster or "
                        "drop --gpu" if use_gpu else "the Ray cluster has no CPUs for the class-image actors")
    if asked <= have:
        return asked, None
    return have, f"--class-actors {asked} lowered to {have}: the cluster has {have} {kind}s"


def class_images(config, base: str, base_id: str, uri: str) -> tuple[int, int, int]:
    """Step 2: make the class table hold `num_class_images` rows of this base and class prompt.

    Counts the rows it has (an expression filter; no rows read), draws only the missing ones in Ray Data
    actors and commits them as one new version. Returns (version, reused, generated)."""
    import numpy as np
    import pyarrow.compute as pc
    import ray.data

    from emoji_ldm.store.delta import CommitDeltaDatasink, open_table, table_exists
    from emoji_ldm.version import code_version

    wanted = (pc.field("base") == base_id) & (pc.field("prompt") == config.class_prompt)
    have = open_table(uri).to_pyarrow_dataset().count_rows(filter=wanted) if table_exists(uri) else 0
    missing = max(0, config.num_class_images - have)
    if missing:
        print(f"[dreambooth] class images: {have} of {config.num_class_images} for {config.class_prompt!r} in "
              f"{uri}; drawing {missing} with the base model", flush=True)
        # the seeds are in the object store (no read tasks) and the commit's write tasks take no CPU, so the
        # model actors may hold every CPU without starving the pipeline around them
        actors, note = class_actor_count(config.class_actors, config.use_gpu, max_resources())
        if note:
            print(f"[dreambooth] {note}", flush=True)
        first = config.seed + have  # new seeds: a re-run after a partial generation draws different images
        wanted_seeds = np.arange(first, first + missing, dtype=np.int64)  # (missing,): the work asked, not a table
        seeds = ray.data.from_numpy([wanted_seeds[i:i + config.class_batch]  # one block per batch, over the actors
                                     for i in range(0, missing, config.class_batch)]).rename_columns({"data": "seed"})
        rows = seeds.map_batches(
            ClassImageSampler,
            fn_constructor_kwargs={"base": base, "base_id": base_id, "prompt": config.class_prompt,
                                   "steps": config.class_steps, "guidance": config.class_guidance,
                                   "device": "cuda" if config.use_gpu else "cpu"},
            batch_size=config.class_batch, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if config.use_gpu else 0,
        )
        rows.write_datasink(CommitDeltaDatasink(uri, schema=CLASS_SCHEMA, metadata={
            "operation": "dreambooth-class-images", "source": base, "model_content_id": base_id,
            "counts": {"added": missing}, "code_version": code_version(),
            "message": f"{missing} class images of {config.class_prompt!r}"}), ray_remote_args={"num_cpus": 0})
    else:
        print(f"[dreambooth] class images: reusing {have} for {config.class_prompt!r} in {uri}", flush=True)
    return open_table(uri).version(), min(have, config.num_class_images), missing


def image_card(instance_uri: str, instance_version: int) -> dict:
    """How the model gets alpha (as `encode.image_lineage`): the SD VAE has 3 channels, so transparent photos
    are learned on the key colour (`decode_images`' default) and its images keyed from it. Photos without
    alpha (JPEG, or opaque PNG in an RGBA table) keep their own backgrounds: "none", nothing is keyed."""
    from emoji_ldm.imaging import KEY_COLOUR
    from emoji_ldm.store.sidecar import image_mode

    mode = image_mode(instance_uri)
    keyed = mode == "RGBA" and any(has_alpha(png) for png in iter_images(instance_uri, instance_version))
    return {"dataset_mode": mode, "vae_channels": 3, "alpha": "key" if keyed else "none",
            "key_colour": KEY_COLOUR if keyed else None}


def has_alpha(png: bytes) -> bool:
    """Whether a stored photo has any pixel less than opaque."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return img.mode in ("RGBA", "LA") and img.getchannel("A").getextrema()[0] < 255


class TrainingImages:
    """A rank's micro-batches: `micro` instance photos and as many class images, drawn at random, as latents of
    the base's VAE, with their prompts' tokens. `run` is the worker's `DreamBoothRun`."""

    def __init__(self, run, worker, pipe, micro: int):
        import pyarrow.compute as pc

        config = run.config
        self.run, self.worker, self.micro = run, worker, micro
        self.vae = pipe.vae.to(worker.device).eval()
        self.instance = read_images(run.instance_uri, run.instance_version)
        self.classes = []
        if run.class_uri:
            wanted = (pc.field("base") == run.base_id) & (pc.field("prompt") == config.class_prompt)
            self.classes = read_images(run.class_uri, run.class_version, wanted, config.num_class_images)
        tokens = pipe.tokenizer([config.instance_prompt, config.class_prompt], padding="max_length",
                                max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        # (2, L): the instance prompt's, the class prompt's
        self.ids, self.mask = tokens.input_ids.to(worker.device), tokens.attention_mask.to(worker.device)

    def batches(self, counters: dict):
        """Endless (latents, input ids, attention mask); the draws go on from the step in `counters`."""
        import numpy as np
        import torch

        from emoji_ldm.train.data import decode_images
        from emoji_ldm.train.speed import batch_layout

        config, device, micro = self.run.config, self.worker.device, self.micro
        rng = np.random.default_rng([config.seed, self.worker.rank, counters["step"]])  # from where it stopped
        scale = float(self.vae.config.scaling_factor)
        while True:
            pngs = [self.instance[i] for i in rng.integers(0, len(self.instance), micro)]
            if self.classes:
                pngs += [self.classes[i] for i in rng.integers(0, len(self.classes), micro)]
            pixels = decode_images({"image": pngs}, self.run.image_size, self.vae.config.in_channels)["pixels"]
            with torch.no_grad():  # (B, C, h, w): instance rows, then class rows
                latents = self.vae.encode(torch.from_numpy(pixels).to(device, torch.float32)).latent_dist.sample()
            rows = torch.tensor([0] * micro + [1] * (len(pngs) - micro), device=device)
            yield (latents * scale).contiguous(memory_format=batch_layout(config.speed)), self.ids[rows], \
                self.mask[rows]
