"""Bulk generation: thousands of emoji from a prompt file, as a resumable Ray Data job.

    emoji-ldm bulk --model URI --prompts FILE --out URI [--per-prompt K]

Input: a prompt file (.txt one prompt per line, or .csv/.parquet with a
`prompt` column; local or S3). Output under `--out`: `images/<prompt_id>-<k>.png`
(each RGBA, with its generation parameters and model id as PNG text chunks,
`emoji_ldm.inference.pngmeta`; with `--target slack|discord|github` sized and
checked for that platform, `inference.targets`; with `--frames N` an animated
loop per image, `images/<prompt_id>-<k>.png|.gif|.webp` as `--format` says,
`inference.animation`) and the Delta table `manifest/` with one row per image
(prompt, seed, settings, URI, size, the emoji's sanitised `name` and `alias`,
and for a loop its `loop` and `file` records); each manifest commit records
the model folder's URI and content id. A name is unique per prompt (`_2`, `_3` for its other
images), not across prompts that sanitise alike ("Cat!" and "cat").

One streaming Ray Data pipeline: the prompt file read by Ray's readers ->
distinct prompts (a groupby on the prompt id) -> on a resume, a left outer
join with the prompts the manifest already holds in full, materialized in the
object store (spilled to disk when large) so the done ones are counted and the
rest drawn from one shuffle -> a pool of model actors
(`BulkGenerator`, the model loaded once per actor) that write the PNGs and
return manifest rows. The driver consumes that stream and commits the
manifest every `--chunk-size` images, so a killed job loses at most one
chunk's rows (their PNGs are rewritten by the re-run). Each commit runs as a
Ray task on a fresh worker, so no process lives through more than one
commit (deltalake's memory grows in a process that commits again and again).
The driver holds at most one chunk of manifest rows; no prompt list,
done-set or todo list.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.inference.animation import EXTENSIONS, AnimationSettings
from emoji_ldm.inference.prompt_file import check_prompts, prompt_dataset, prompt_partitions
from emoji_ldm.inference.sampler import InferenceOptions
from emoji_ldm.inference.settings import SamplerSettings
from emoji_ldm.inference.targets import TARGETS
from emoji_ldm.runtime.partitions import shuffle_partitions

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
    ("name", pa.string()),               # the emoji's upload name: "grinning_cat", "grinning_cat_2"
    ("alias", pa.string()),              # ":grinning_cat:"
    ("target", pa.string()),             # slack | discord | github | raw
    ("loop", pa.string()),               # an animated loop (--frames): JSON of the loop and its metrics; else null
    ("file", pa.string()),               # an animated loop: JSON of what fitting kept (format, frames, colours, size)
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
    chunk_size: int = opt(512, help="images per manifest commit; a killed job redoes at most one chunk")
    limit: int | None = opt(None, help="only the first N distinct prompts")
    target: str = opt("raw", help="slack | discord | github: PNGs at 128 x 128 under the platform's file-size "
                                  "limit; raw: as drawn")
    png_metadata: bool = opt(True, flag="no-png-metadata", invert=True,
                             help="write the PNGs without their generation parameters and model id")
    inference: InferenceOptions = opt(default_factory=InferenceOptions,
                                      help="pipeline dtype, channels-last and compile")
    animation: AnimationSettings = opt(default_factory=AnimationSettings, help="an animated loop per image")

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.concurrency >= 1, f"--concurrency must be >= 1, got {self.concurrency}"),
            (self.num_cpus > 0, f"--num-cpus must be > 0, got {self.num_cpus}"),
            (self.num_gpus >= 0, f"--num-gpus must be >= 0, got {self.num_gpus}"),
            (self.chunk_size >= 1, f"--chunk-size must be >= 1, got {self.chunk_size}"),
            (self.limit is None or self.limit >= 1, f"--limit must be >= 1, got {self.limit}"),
            (self.target in TARGETS, f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.animation.check_scheduler(self.sampler.scheduler)


PROMPT_ID_BYTES = 80  # a prompt id (64 hex characters) in a shuffle


def _done_prompts(manifest_uri: str, per_prompt: int):
    """A Ray Dataset of the prompt ids with all `per_prompt` images in the manifest, or None."""
    from emoji_ldm.store.delta import open_table, read_dataset, table_exists
    from emoji_ldm.store.log import file_actions
    from emoji_ldm.store.uri import DatasetRef

    if not table_exists(manifest_uri):
        return None
    ids, version = read_dataset(manifest_uri, columns=["prompt_id"])
    actions = file_actions(open_table(DatasetRef(manifest_uri, version=version)))
    rows = int(pc.sum(pc.fill_null(actions.column("num_records"), 0)).as_py() or 0)
    counts = ids.groupby("prompt_id", num_partitions=shuffle_partitions(rows * PROMPT_ID_BYTES)).count()
    return counts.map_batches(lambda t: t.filter(pc.greater_equal(t.column("count()"), per_prompt))
                              .select(["prompt_id"]), batch_format="pyarrow")


def _mark_done(batch: pa.Table) -> pa.Table:
    return batch.append_column("done", pa.array([True] * batch.num_rows, pa.bool_()))


def _marked(batch: pa.Table, done: bool) -> pa.Table:
    """The prompts of a left-outer-joined batch that are done (or not), as (prompt_id, prompt)."""
    flag = pc.fill_null(batch.column("done"), False)
    return batch.filter(flag if done else pc.invert(flag)).select(["prompt_id", "prompt"])


class BulkGenerator:
    """A Ray Data actor: one pipeline; a batch of prompts in, PNGs written and manifest rows out."""

    def __init__(self, model: str, images_uri: str, settings: SamplerSettings, device: str, png_metadata: bool = True,
                 inference: InferenceOptions | None = None, images_per_call: int = 1, target: str = "raw",
                 animation: AnimationSettings | None = None):
        from emoji_ldm.inference.sampler import Sampler
        from emoji_ldm.store.uri import filesystem, is_s3

        self.sampler = Sampler.load(model, device=device, options=inference)
        if inference and inference.compile:  # compile before the first batch, at the sizes batches have
            self.sampler.warm_up((images_per_call,))
        self.fs, self.root = filesystem(images_uri)
        self.images_uri = images_uri.rstrip("/")
        if not is_s3(images_uri):  # S3 has no folders (create_dir would leave an empty marker object)
            self.fs.create_dir(self.root, recursive=True)
        self.settings, self.model, self.png_metadata = settings, model, png_metadata
        self.images_per_call = images_per_call
        self.target = TARGETS[target]
        self.animation = animation if animation is not None and animation.animated else None
        from emoji_ldm.inference.provenance import SigningKeys
        from emoji_ldm.inference.sampler import model_card

        # each actor reads the operator's C2PA keys itself (EMOJI_LDM_C2PA_CERT / _KEY, files every node has):
        # the key never travels through Ray's object store
        self.keys = SigningKeys.from_env()
        self.card = model_card(model) if self.keys else None

    def _file(self, data: bytes, params: dict) -> tuple[bytes, str, str | None, str | None]:
        """An image as the target takes it: (bytes, extension, the loop's JSON, the file's JSON); an animated
        loop (`animation.drawn_loop`) as its format under the target's cap, else the PNG fitted."""
        import json

        from emoji_ldm.inference.animation import fitted_loop
        from emoji_ldm.inference.targets import fit

        if self.animation is None:
            return fit(data, self.target), ".png", None, None
        data, record = fitted_loop(data, self.animation, self.target, params if self.png_metadata else None)
        return (data, EXTENSIONS[self.animation.format], json.dumps({**record["loop"], **record["metrics"]}),
                json.dumps(record["file"]))

    def __call__(self, batch: dict) -> pa.Table:
        from emoji_ldm.inference.provenance import lineage_of, signed_files
        from emoji_ldm.inference.sampler import SampleJob
        from emoji_ldm.inference.targets import emoji_name
        from emoji_ldm.runtime.heap import release_free_heap

        s = self.settings
        prompts = [str(p) for p in batch["prompt"]]
        seeds = tuple(s.seed + i for i in range(s.count))
        jobs = [SampleJob.of((p,) * s.count, seeds, s, animation=self.animation) for p in prompts]
        rows = []
        now = dt.datetime.now(dt.timezone.utc)
        made_per_prompt = self.sampler.pngs(jobs, self.png_metadata, self.images_per_call)
        for pid, prompt, made in zip(batch["prompt_id"], prompts, made_per_prompt):
            names: set[str] = set()
            for i, (data, params) in enumerate(made):
                data, ext, loop, record = self._file(data, params)
                file = f"{pid}-{i:02d}{ext}"
                signed = signed_files(file, data, lineage_of(params, self.card), self.keys, self.target)
                for name, blob in signed.items():  # the file, and its .c2pa sidecar when the manifest did not fit
                    with self.fs.open_output_stream(f"{self.root.rstrip('/')}/{name}") as f:
                        f.write(blob)
                data = signed[file]
                width, height = (self.target.size,) * 2 if self.target.size else map(int, params["size"].split("x"))
                name = emoji_name(prompt, names)
                rows.append({"prompt_id": str(pid), "prompt": prompt, "index": i, "seed": seeds[i],
                             "uri": f"{self.images_uri}/{file}", "width": width, "height": height,
                             "png_bytes": len(data), "negative_prompt": s.negative_prompt, "steps": s.steps,
                             "guidance": s.guidance, "scheduler": s.scheduler, "model": self.model,
                             "generated_at": now, "name": name, "alias": f":{name}:", "target": self.target.name,
                             "loop": loop, "file": record})
        release_free_heap()  # the batch's freed activations back to the OS: the actor stays flat
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def check_manifest(manifest_uri: str) -> None:
    """A table this run appends to must be a bulk manifest: every column of `MANIFEST_SCHEMA`."""
    from emoji_ldm.store.delta import arrow_dataset, open_table, table_exists

    if not table_exists(manifest_uri):
        return
    missing = [n for n in MANIFEST_SCHEMA.names if n not in arrow_dataset(open_table(manifest_uri)).schema.names]
    if missing:
        raise UserError(f"the table at {manifest_uri} has no {', '.join(missing)} column(s): it is not a bulk "
                        "manifest; give another --out")


def _commit_chunk(manifest_uri: str, table: pa.Table, metadata: dict) -> int:
    """One manifest commit, run as a Ray task on a fresh worker that exits after it (max_calls=1).

    Each commit loads a snapshot of the manifest, one file larger every time, and a process that commits
    over and over keeps deltalake's high-water mark (bench/manifest_commits.py): a fresh process per commit
    keeps the driver flat. num_cpus=0: it runs while the model actors hold every CPU."""
    from emoji_ldm.store.delta import append_rows

    return append_rows(manifest_uri, table, metadata)


class ManifestCommitter:
    """The driver's side of the manifest: it buffers the rows the model actors return and commits them every
    `chunk_size` images (`_commit_chunk`, in its own process), so a killed job loses at most one chunk. It holds
    at most one chunk of rows, and counts the images, prompts and commits made."""

    def __init__(self, manifest_uri: str, chunk_size: int, metadata: dict, start: float):
        import ray

        self.manifest_uri, self.chunk_size, self.metadata, self.start = manifest_uri, chunk_size, metadata, start
        self.run_id = uuid.uuid4().hex[:12]
        self.pending: list[pa.Table] = []
        self.buffered = self.images = self.prompts = self.commits = 0
        self._task = ray.remote(num_cpus=0, max_calls=1)(_commit_chunk)

    def add(self, batch: pa.Table) -> None:
        self.pending.append(batch.cast(MANIFEST_SCHEMA))
        self.buffered += batch.num_rows
        if self.buffered >= self.chunk_size:
            self.commit()

    def commit(self) -> None:
        """One Delta commit of the buffered rows (creating the table on the first one); none when empty."""
        import ray

        table = pa.concat_tables(self.pending) if self.buffered else None
        self.pending, self.buffered = [], 0
        if table is None:
            return
        self.commits += 1
        prompts = len(pc.unique(table.column("prompt_id")))
        metadata = {**self.metadata, "build_id": f"{self.run_id}-{self.commits}",
                    "counts": {"images": table.num_rows, "prompts": prompts}, "message": f"bulk commit {self.commits}"}
        version = ray.get(self._task.remote(self.manifest_uri, table, metadata))
        self.images += table.num_rows
        self.prompts += prompts
        rate = self.images / (time.perf_counter() - self.start)
        print(f"bulk: {self.images} images so far ({rate:.1f} images/s) -> manifest version {version}", flush=True)


def _todo_prompts(config: BulkConfig, prompts_uri: str, manifest_uri: str):
    """(the prompts to draw, how many are done already): the file's distinct prompts (its first `--limit`) less
    those with all their images in the manifest. None for the first when every prompt is done."""
    prompts = prompt_dataset(prompts_uri)
    if config.limit:
        prompts = prompts.limit(config.limit)
    done = _done_prompts(manifest_uri, config.sampler.count)
    if done is None:
        return prompts, 0
    # one shuffle: every prompt marked done or not, held in the object store (spilled to disk at scale), so
    # counting the done ones and generating the rest do not run the groupby and the join twice
    marked = prompts.join(done.map_batches(_mark_done, batch_format="pyarrow"), "left_outer",
                          num_partitions=prompt_partitions(prompts_uri), on=("prompt_id",)).materialize()
    skipped = marked.map_batches(_marked, fn_kwargs={"done": True}, batch_format="pyarrow").count()
    todo = marked.map_batches(_marked, fn_kwargs={"done": False}, batch_format="pyarrow")  # lazy: one copy held
    return (None if skipped == marked.count() else todo), skipped


def _drawn_rows(config: BulkConfig, prompts, model: str, images_uri: str):
    """The prompts through a pool of model actors: a Ray Dataset of manifest rows, their PNGs written."""
    import ray.data

    per_prompt = config.sampler.count
    per_call = max(1, config.batch_size // per_prompt)  # prompts per pipeline call
    return prompts.map_batches(
        BulkGenerator,
        fn_constructor_kwargs={"model": model, "images_uri": images_uri, "settings": config.sampler,
                               "device": "cuda" if config.num_gpus > 0 else "cpu",
                               "png_metadata": config.png_metadata, "inference": config.inference,
                               "images_per_call": min(per_call * per_prompt, config.batch_size),
                               "target": config.target, "animation": config.animation},
        batch_size=per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
    )


def bulk_generate(config: BulkConfig) -> dict:
    """Generate `per_prompt` images for every prompt not yet in the manifest; returns a summary."""
    from emoji_ldm.inference.sampler import model_card, model_uri
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import check_writable
    from emoji_ldm.store.uri import join, normalize_uri
    from emoji_ldm.version import code_version

    start = time.perf_counter()
    model = normalize_uri(config.model)
    folder = model_uri(model)  # a clear error now rather than in every actor
    out = check_writable(config.out)
    prompts_uri = normalize_uri(config.prompts)
    check_prompts(prompts_uri)
    manifest_uri, images_uri = join(out, "manifest"), join(out, "images")
    check_manifest(manifest_uri)
    per_prompt = config.sampler.count
    # the model's own guidance where none is set: in the actors' settings, the rows and the commits
    config = dataclasses.replace(config, sampler=config.sampler.with_model_guidance(model_card(folder)))
    ensure_ray()
    for uri, what in ((out, "the output (--out)"), (prompts_uri, "the prompt file (--prompts)"),
                      (model, "the model (--model)")):
        require_shared(uri, what)
    summary = {"out": out, "manifest": manifest_uri, "images_uri": images_uri}
    prompts, skipped = _todo_prompts(config, prompts_uri, manifest_uri)
    if prompts is None:  # nothing to draw: no model actor is started
        print(f"bulk: all {skipped} prompts of {config.prompts} already have {per_prompt} image(s) in "
              f"{manifest_uri}; nothing to do", flush=True)
        return {**summary, "skipped": skipped, "generated_prompts": 0, "images": 0, "commits": 0,
                "seconds": time.perf_counter() - start}
    print(f"bulk: prompts from {config.prompts}; {skipped} already generated; the rest x {per_prompt} images "
          f"on {config.concurrency} model actor(s), manifest committed every {config.chunk_size} images",
          flush=True)
    metadata = {"operation": "bulk-generate", "source": prompts_uri, "model": folder,
                "model_content_id": model_card(folder).get("content_id"), "code_version": code_version(),
                "config": dataclasses.asdict(config)}
    committer = ManifestCommitter(manifest_uri, config.chunk_size, metadata, start)
    for batch in _drawn_rows(config, prompts, model, images_uri).iter_batches(batch_format="pyarrow",
                                                                              batch_size=None):
        committer.add(batch)
    committer.commit()
    return {**summary, "skipped": skipped, "generated_prompts": committer.prompts, "images": committer.images,
            "commits": committer.commits, "seconds": time.perf_counter() - start}


def report(summary: dict) -> str:
    return (f"bulk: {summary['images']} images for {summary['generated_prompts']} prompts in "
            f"{summary['seconds']:.1f} s; manifest {summary['manifest']}, images {summary['images_uri']}")
