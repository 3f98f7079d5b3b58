"""Bulk generation: thousands of emoji from a prompt file, as a resumable Ray Data job.

    emoji-ldm bulk --model URI --prompts FILE --out URI [--per-prompt K]

Input: a prompt file (.txt one prompt per line, or .csv/.parquet with a
`prompt` column; local or S3). Output under `--out`: `images/<prompt_id>-<k>.png`
and the Delta table `manifest/` with one row per image (prompt, seed, settings,
URI, size). Prompts are sharded across model actors (a Ray Data actor pool, one
pipeline per actor). The work is committed in chunks, one manifest version per
chunk, so a killed job loses at most one chunk and a re-run skips every prompt
already in the manifest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa

from emoji_ldm.errors import UserError
from emoji_ldm.options import opt
from emoji_ldm.sampling import SamplerSettings

MANIFEST_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),          # sha1 of the prompt text, 16 hex
    ("prompt", pa.string()),
    ("index", pa.int32()),               # k of per_prompt
    ("seed", pa.int64()),                # seed + k: the same image /v1/generate gives for that seed
    ("uri", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("png_bytes", pa.int64()),
    ("negative_prompt", pa.string()),
    ("steps", pa.int32()),
    ("guidance", pa.float32()),
    ("scheduler", pa.string()),
    ("model", pa.string()),
    ("generated_at", pa.timestamp("us", tz="UTC")),
])


@dataclass(frozen=True)
class BulkConfig:
    model: str = opt(help="a model folder/URI (or a training --out)")
    prompts: str = opt(help=".txt (one per line), .csv or .parquet with a prompt column (local or s3://)")
    out: str = opt(help="output URI: images/ and the manifest/ Delta table")
    sampler: SamplerSettings = opt(default_factory=SamplerSettings, help="sampler settings",
                                   rename={"count": "per-prompt"})
    batch_size: int = opt(32, help="images per pipeline call")
    concurrency: int = opt(1, help="model actors")
    num_cpus: float = opt(1.0, help="CPUs per model actor; on CPU it is also the actor's torch threads")
    num_gpus: float = opt(0.0, help="GPUs per model actor (0: CPU)")
    chunk_size: int = opt(512, help="prompts per manifest commit; a killed job redoes at most one chunk")
    limit: int | None = opt(None, help="only the first N distinct prompts")

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.concurrency >= 1, f"--concurrency must be >= 1, got {self.concurrency}"),
            (self.num_cpus > 0, f"--num-cpus must be > 0, got {self.num_cpus}"),
            (self.num_gpus >= 0, f"--num-gpus must be >= 0, got {self.num_gpus}"),
            (self.chunk_size >= 1, f"--chunk-size must be >= 1, got {self.chunk_size}"),
            (self.limit is None or self.limit >= 1, f"--limit must be >= 1, got {self.limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


def read_prompts(uri: str) -> list[str]:
    """Prompts from .txt (one per line; blank lines and # comments skipped), .csv or .parquet (`prompt` column)."""
    import io

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from emoji_ldm.store.artifacts import read_bytes

    name = uri.lower()
    if not name.endswith((".txt", ".csv", ".parquet")):
        raise UserError(f"--prompts {uri!r}: use a .txt (one prompt per line), .csv or .parquet file")
    data = read_bytes(uri)
    if name.endswith(".txt"):
        lines = data.decode("utf-8", errors="replace").splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        try:
            table = pcsv.read_csv(io.BytesIO(data)) if name.endswith(".csv") else pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"--prompts {uri!r} cannot be read: {e}") from None
        if "prompt" not in table.column_names:
            raise UserError(f"--prompts {uri!r} has no `prompt` column (columns: {', '.join(table.column_names)})")
        prompts = [" ".join(str(p).split()) for p in table.column("prompt").to_pylist() if p and str(p).strip()]
    if not prompts:
        raise UserError(f"--prompts {uri!r} has no prompts")
    return prompts


def done_prompt_ids(manifest_uri: str, per_prompt: int) -> set[str]:
    """Prompts with all their images in the manifest (at its latest version)."""
    from collections import Counter

    from emoji_ldm.store.delta import open_table, table_exists

    if not table_exists(manifest_uri):
        return set()
    ids = open_table(manifest_uri).to_pyarrow_table(columns=["prompt_id"]).column("prompt_id").to_pylist()
    return {pid for pid, n in Counter(ids).items() if n >= per_prompt}


class BulkGenerator:
    """A Ray Data actor: one pipeline; a batch of prompts in, PNGs written and manifest rows out."""

    def __init__(self, model: str, images_uri: str, settings: SamplerSettings, device: str):
        from emoji_ldm.generate import Sampler
        from emoji_ldm.store.uri import filesystem, is_s3

        self.sampler = Sampler.load(model, device=device)
        self.fs, self.root = filesystem(images_uri)
        self.images_uri = images_uri.rstrip("/")
        if not is_s3(images_uri):  # S3 has no folders (create_dir would leave an empty marker object)
            self.fs.create_dir(self.root, recursive=True)
        self.settings, self.model = settings, model

    def __call__(self, batch: dict) -> pa.Table:
        from emoji_ldm.generate import SampleJob, png_bytes

        s = self.settings
        prompts = [str(p) for p in batch["prompt"]]
        seeds = tuple(s.seed + i for i in range(s.count))
        jobs = [SampleJob.of((p,) * s.count, seeds, s) for p in prompts]
        rows = []
        now = dt.datetime.now(dt.timezone.utc)
        for pid, prompt, images in zip(batch["prompt_id"], prompts, self.sampler.sample(jobs)):
            for i, image in enumerate(images):
                name = f"{pid}-{i:02d}.png"
                data = png_bytes(image)
                with self.fs.open_output_stream(f"{self.root.rstrip('/')}/{name}") as f:
                    f.write(data)
                rows.append({"prompt_id": str(pid), "prompt": prompt, "index": i, "seed": seeds[i],
                             "uri": f"{self.images_uri}/{name}", "width": image.width, "height": image.height,
                             "png_bytes": len(data), "negative_prompt": s.negative_prompt, "steps": s.steps,
                             "guidance": s.guidance, "scheduler": s.scheduler, "model": self.model,
                             "generated_at": now})
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def bulk_generate(config: BulkConfig) -> dict:
    """Generate `per_prompt` images for every prompt not yet in the manifest; returns a summary."""
    import ray.data

    from emoji_ldm.generate import model_folder
    from emoji_ldm.runtime import ensure_ray
    from emoji_ldm.store.artifacts import check_writable
    from emoji_ldm.store.delta import CommitDeltaDatasink
    from emoji_ldm.store.uri import join, normalize_uri
    from emoji_ldm.version import code_version

    start = time.perf_counter()
    model = normalize_uri(config.model)
    model_folder(model)  # a clear error now rather than in every actor
    out = check_writable(config.out)
    prompts = read_prompts(normalize_uri(config.prompts))
    unique = list(dict.fromkeys(prompts))
    duplicates = len(prompts) - len(unique)
    if config.limit:
        unique = unique[: config.limit]
    manifest_uri, images_uri = join(out, "manifest"), join(out, "images")
    per_prompt = config.sampler.count
    done = done_prompt_ids(manifest_uri, per_prompt)
    todo = [{"prompt_id": prompt_id(p), "prompt": p} for p in unique if prompt_id(p) not in done]
    print(f"bulk: {len(prompts)} prompts in {config.prompts} ({duplicates} duplicates), "
          f"{len(unique) - len(todo)} already generated, {len(todo)} to do x {per_prompt} images "
          f"on {config.concurrency} model actor(s)", flush=True)
    made = 0
    if todo:
        ensure_ray()
    chunks = [todo[i:i + config.chunk_size] for i in range(0, len(todo), config.chunk_size)]
    for n, chunk in enumerate(chunks, 1):
        t0 = time.perf_counter()
        per_call = max(1, config.batch_size // per_prompt)  # prompts per pipeline call
        # one block per pipeline call: batches do not span blocks, and tiny blocks would mean tiny calls
        ds = ray.data.from_items(chunk, override_num_blocks=-(-len(chunk) // per_call)).map_batches(
            BulkGenerator,
            fn_constructor_kwargs={"model": model, "images_uri": images_uri, "settings": config.sampler,
                                   "device": "cuda" if config.num_gpus > 0 else "cpu"},
            batch_size=per_call,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
        )
        metadata = {"operation": "bulk-generate", "source": config.prompts, "model": model,
                    "code_version": code_version(), "build_id": uuid.uuid4().hex[:12],
                    "counts": {"prompts": len(chunk), "images": len(chunk) * per_prompt},
                    "config": dataclasses.asdict(config), "message": f"bulk chunk {n}/{len(chunks)}"}
        ds.write_datasink(CommitDeltaDatasink(manifest_uri, schema=MANIFEST_SCHEMA, metadata=metadata))
        images = len(chunk) * per_prompt
        made += images
        seconds = time.perf_counter() - t0
        print(f"bulk: chunk {n}/{len(chunks)}: {len(chunk)} prompts, {images} images in {seconds:.1f} s "
              f"({images / seconds:.1f} images/s) -> {manifest_uri}", flush=True)
    seconds = time.perf_counter() - start
    summary = {"out": out, "manifest": manifest_uri, "images_uri": images_uri, "prompts": len(unique),
               "skipped": len(unique) - len(todo), "generated_prompts": len(todo), "images": made,
               "seconds": seconds}
    return summary


def report(summary: dict) -> str:
    return (f"bulk: {summary['images']} images for {summary['generated_prompts']} prompts in "
            f"{summary['seconds']:.1f} s; manifest {summary['manifest']}, images {summary['images_uri']}")
