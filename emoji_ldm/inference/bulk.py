"""Bulk generation: thousands of emoji from a prompt file, as a resumable Ray Data job.

    emoji-ldm bulk --model URI --prompts FILE --out URI [--per-prompt K]

Input: a prompt file (.txt one prompt per line, or .csv/.parquet with a
`prompt` column; local or S3). Output under `--out`: `images/<prompt_id>-<k>.png`
(each RGBA, with its generation parameters and model id as PNG text chunks,
`emoji_ldm.inference.pngmeta`; with `--target slack|discord|github` sized and
checked for that platform, `inference.targets`) and the Delta table `manifest/`
with one row per image (prompt, seed, settings, URI, size, the emoji's
sanitised `name` and `alias`); each manifest commit records the model folder's
URI and content id. A name is unique per prompt (`_2`, `_3` for its other
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
import hashlib
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
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


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


PROMPT_FORMATS = (".txt", ".csv", ".parquet")
HEAD_ROWS = 10_000
PROMPT_ID_BYTES = 80  # a prompt id (64 hex characters) in a shuffle


def check_prompts(uri: str) -> str | None:
    """Check the prompt file on the driver from its head; returns the CSV/Parquet `prompt` column name."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from emoji_ldm.store.uri import filesystem

    name = uri.lower()
    if not name.endswith(PROMPT_FORMATS):
        raise UserError(f"--prompts {uri!r}: use a .txt (one prompt per line), .csv or .parquet file")
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type.name != "File":
        raise UserError(f"--prompts {uri!r} does not exist")
    try:
        if name.endswith(".txt"):
            with fs.open_input_stream(path) as f:
                for n, line in enumerate(f.read(4 << 20).decode("utf-8", errors="replace").splitlines()):
                    if line.strip() and not line.lstrip().startswith("#"):
                        return None
                    if n > HEAD_ROWS:
                        break
            raise UserError(f"--prompts {uri!r} has no prompts")
        if name.endswith(".csv"):
            with fs.open_input_stream(path) as f:
                head = pa.Table.from_batches([pcsv.open_csv(f).read_next_batch()])
        else:
            with fs.open_input_file(path) as f:
                first = next(pq.ParquetFile(f).iter_batches(batch_size=HEAD_ROWS), None)
                head = pa.Table.from_batches([first]) if first is not None else pa.table({"prompt": []})
    except StopIteration:
        raise UserError(f"--prompts {uri!r} has no prompts") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"--prompts {uri!r} cannot be read: {e}") from None
    if "prompt" not in head.column_names:
        raise UserError(f"--prompts {uri!r} has no `prompt` column (columns: {', '.join(head.column_names)})")
    if not any(p and str(p).strip() for p in head.column("prompt").to_pylist()):
        raise UserError(f"--prompts {uri!r} has no prompts")
    return "prompt"


def _prompt_rows(batch: pa.Table, column: str) -> pa.Table:
    """Ray Data task: lines or rows -> (prompt_id, prompt), whitespace normalised, blanks and # comments dropped."""
    prompts = []
    for p in batch.column(column).to_pylist():
        p = " ".join(str(p or "").split())
        if p and not (column == "text" and p.startswith("#")):
            prompts.append(p)
    return pa.table({"prompt_id": [prompt_id(p) for p in prompts], "prompt": prompts},
                    schema=pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())]))


def prompt_dataset(uri: str):
    """The distinct prompts of a prompt file, as a Ray Dataset of (prompt_id, prompt)."""
    import ray.data

    from emoji_ldm.store.uri import filesystem

    check_prompts(uri)
    fs, path = filesystem(uri)
    name = uri.lower()
    if name.endswith(".txt"):
        ds, column = ray.data.read_text(path, filesystem=fs), "text"
    elif name.endswith(".csv"):
        ds, column = ray.data.read_csv(path, filesystem=fs), "prompt"
    else:
        ds, column = ray.data.read_parquet(path, filesystem=fs).select_columns(["prompt"]), "prompt"
    rows = ds.map_batches(_prompt_rows, fn_kwargs={"column": column}, batch_format="pyarrow")
    return rows.groupby("prompt_id", num_partitions=prompt_partitions(uri)).map_groups(
        lambda g: g.slice(0, 1), batch_format="pyarrow")


def prompt_partitions(uri: str) -> int:
    """Shuffle partitions for the prompts of a prompt file (its size on storage x 4: the rows gain a 64-character
    prompt id, and a Parquet file is compressed): they grow with the file, not each task's memory."""
    from emoji_ldm.store.uri import filesystem

    fs, path = filesystem(uri)
    return shuffle_partitions(4 * (fs.get_file_info(path).size or 0))


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
                 inference: InferenceOptions | None = None, images_per_call: int = 1, target: str = "raw"):
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

    def __call__(self, batch: dict) -> pa.Table:
        from emoji_ldm.inference.sampler import SampleJob
        from emoji_ldm.inference.targets import emoji_name, fit
        from emoji_ldm.runtime.heap import release_free_heap

        s = self.settings
        prompts = [str(p) for p in batch["prompt"]]
        seeds = tuple(s.seed + i for i in range(s.count))
        jobs = [SampleJob.of((p,) * s.count, seeds, s) for p in prompts]
        rows = []
        now = dt.datetime.now(dt.timezone.utc)
        made_per_prompt = self.sampler.pngs(jobs, self.png_metadata, self.images_per_call)
        for pid, prompt, made in zip(batch["prompt_id"], prompts, made_per_prompt):
            names: set[str] = set()
            for i, (data, params) in enumerate(made):
                data = fit(data, self.target)
                file = f"{pid}-{i:02d}.png"
                with self.fs.open_output_stream(f"{self.root.rstrip('/')}/{file}") as f:
                    f.write(data)
                width, height = (self.target.size,) * 2 if self.target.size else map(int, params["size"].split("x"))
                name = emoji_name(prompt, names)
                rows.append({"prompt_id": str(pid), "prompt": prompt, "index": i, "seed": seeds[i],
                             "uri": f"{self.images_uri}/{file}", "width": width, "height": height,
                             "png_bytes": len(data), "negative_prompt": s.negative_prompt, "steps": s.steps,
                             "guidance": s.guidance, "scheduler": s.scheduler, "model": self.model,
                             "generated_at": now, "name": name, "alias": f":{name}:", "target": self.target.name})
        release_free_heap()  # the batch's activations, freed, back to the OS: the actor stays flat (issue 28)
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def check_manifest(manifest_uri: str) -> None:
    """A manifest this run appends to must have today's columns (one written before names and targets has not)."""
    from emoji_ldm.store.delta import arrow_dataset, open_table, table_exists

    if not table_exists(manifest_uri):
        return
    missing = [n for n in MANIFEST_SCHEMA.names if n not in arrow_dataset(open_table(manifest_uri)).schema.names]
    if missing:
        raise UserError(f"the manifest {manifest_uri} has no {', '.join(missing)} column(s): it was written by an "
                        "older emoji-ldm; give a new --out (its images and manifest stay readable)")


def _commit_chunk(manifest_uri: str, table: pa.Table, metadata: dict) -> int:
    """One manifest commit, run as a Ray task on a fresh worker that exits after it (max_calls=1).

    Each commit loads a snapshot of the manifest, one file larger every time, and a process that commits
    over and over keeps deltalake's high-water mark: the commit loop alone grew 1.35x from 196 to 1,954
    commits (bench/manifest_commits.py). A fresh process per commit keeps the driver flat, and each commit's
    own process costs what one snapshot does. num_cpus=0: it runs while the model actors hold every CPU."""
    from emoji_ldm.store.delta import append_rows

    return append_rows(manifest_uri, table, metadata)


def bulk_generate(config: BulkConfig) -> dict:
    """Generate `per_prompt` images for every prompt not yet in the manifest; returns a summary."""
    import ray.data

    from emoji_ldm.inference.sampler import model_card, model_uri
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import check_writable
    from emoji_ldm.store.uri import join, normalize_uri
    from emoji_ldm.version import code_version

    start = time.perf_counter()
    model = normalize_uri(config.model)
    folder = model_uri(model)  # a clear error now rather than in every actor
    content_id = model_card(folder).get("content_id")
    out = check_writable(config.out)
    prompts_uri = normalize_uri(config.prompts)
    check_prompts(prompts_uri)
    manifest_uri, images_uri = join(out, "manifest"), join(out, "images")
    check_manifest(manifest_uri)
    per_prompt = config.sampler.count
    ensure_ray()
    for uri, what in ((out, "the output (--out)"), (prompts_uri, "the prompt file (--prompts)"),
                      (model, "the model (--model)")):
        require_shared(uri, what)
    prompts = prompt_dataset(prompts_uri)
    if config.limit:
        prompts = prompts.limit(config.limit)
    done = _done_prompts(manifest_uri, per_prompt)
    skipped = 0
    if done is not None:
        # one shuffle: every prompt marked done or not, held in the object store (spilled to disk at scale), so
        # counting the done ones and generating the rest do not run the groupby and the join twice
        marked = prompts.join(done.map_batches(_mark_done, batch_format="pyarrow"), "left_outer",
                              num_partitions=prompt_partitions(prompts_uri),
                              on=("prompt_id",)).materialize()
        skipped = marked.map_batches(_marked, fn_kwargs={"done": True}, batch_format="pyarrow").count()
        prompts = marked.map_batches(_marked, fn_kwargs={"done": False}, batch_format="pyarrow").materialize()
        if prompts.count() == 0:  # nothing to draw: no model actor is started
            print(f"bulk: all {skipped} prompts of {config.prompts} already have {per_prompt} image(s) in "
                  f"{manifest_uri}; nothing to do", flush=True)
            return {"out": out, "manifest": manifest_uri, "images_uri": images_uri, "skipped": skipped,
                    "generated_prompts": 0, "images": 0, "commits": 0, "seconds": time.perf_counter() - start}
    print(f"bulk: prompts from {config.prompts}; {skipped} already generated; the rest x {per_prompt} images "
          f"on {config.concurrency} model actor(s), manifest committed every {config.chunk_size} images",
          flush=True)
    per_call = max(1, config.batch_size // per_prompt)  # prompts per pipeline call
    rows = prompts.map_batches(
        BulkGenerator,
        fn_constructor_kwargs={"model": model, "images_uri": images_uri, "settings": config.sampler,
                               "device": "cuda" if config.num_gpus > 0 else "cpu",
                               "png_metadata": config.png_metadata, "inference": config.inference,
                               "images_per_call": min(per_call * per_prompt, config.batch_size),
                               "target": config.target},
        batch_size=per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
    )
    run_id = uuid.uuid4().hex[:12]
    made, prompts_made, commits, pending = 0, 0, 0, []
    commit_task = ray.remote(num_cpus=0, max_calls=1)(_commit_chunk)

    def commit() -> None:
        nonlocal made, prompts_made, commits, pending
        table = pa.concat_tables(pending)
        pending = []
        commits += 1
        metadata = {"operation": "bulk-generate", "source": prompts_uri, "model": folder,
                    "model_content_id": content_id,
                    "code_version": code_version(), "build_id": f"{run_id}-{commits}",
                    "counts": {"images": table.num_rows, "prompts": len(pc.unique(table.column("prompt_id")))},
                    "config": dataclasses.asdict(config), "message": f"bulk commit {commits}"}
        # one Delta commit of this chunk's rows (creating the table on the first one), in its own process; the
        # pipeline keeps drawing meanwhile
        version = ray.get(commit_task.remote(manifest_uri, table, metadata))
        made += table.num_rows
        prompts_made += metadata["counts"]["prompts"]
        seconds = time.perf_counter() - start
        print(f"bulk: {made} images so far ({made / seconds:.1f} images/s) -> manifest version {version}",
              flush=True)

    buffered = 0
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        pending.append(batch.cast(MANIFEST_SCHEMA))
        buffered += batch.num_rows
        if buffered >= config.chunk_size:
            commit()
            buffered = 0
    if pending and sum(t.num_rows for t in pending):
        commit()
    seconds = time.perf_counter() - start
    return {"out": out, "manifest": manifest_uri, "images_uri": images_uri, "skipped": skipped,
            "generated_prompts": prompts_made, "images": made, "commits": commits, "seconds": seconds}


def report(summary: dict) -> str:
    return (f"bulk: {summary['images']} images for {summary['generated_prompts']} prompts in "
            f"{summary['seconds']:.1f} s; manifest {summary['manifest']}, images {summary['images_uri']}")
