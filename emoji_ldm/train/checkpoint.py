"""Checkpoints of a training run, the same for every recipe (`train`, `dreambooth`, `train-vae`).

A checkpoint is one Ray Train checkpoint under `OUT/checkpoints/<run>/step-XXXXXXXX/`:
  ds/                 the DeepSpeed engine's state: every rank's shard of the weights and optimizer
  rng-rank<R>.pt      each rank's RNG state (CPU, and CUDA on a GPU): a resumed run draws the same noise,
                      timesteps and caption dropout as the run it continues
  ema.pt              the full fp32 EMA (gathered to rank 0 from every rank's partition), when the
                      recipe keeps one; every rank reads its partition back on a resume
  state.json          the loop's counters (step, and the recipe's data position), the world size, the ZeRO stage
                      and what else must match to resume: the mark of a complete checkpoint, written by rank 0
                      straight to the storage once every rank has uploaded its part (a folder without it is
                      never resumed from)

`save` is called by every rank at the same step (`loop.Loop.after_step`); `restore` puts a worker back where a
checkpoint left it; `latest` finds the newest complete checkpoint; `open_checkpoint` builds the Ray Train
checkpoint with the project's filesystem (so `s3://` resumes reach MinIO with the project's endpoint and
credentials).

Where the folders go is the storage's: `RayTrainStorage` (a run under Ray Train: `ray.train.report` merges every
rank's folder into the run's checkpoint) or `FolderStorage` (a run without Ray Train, one process: the folder is
copied to OUT/checkpoints/<run>/ as it is). Both leave the same layout, which `latest` and `restore` read.

`--async-checkpoints` (`RayTrainStorage(upload="async")`): Ray Train's ASYNC upload mode. Each rank's folder goes up
in a background thread while training goes on, and Ray Train deletes it once it is up. The state.json mark then
waits until Ray Train has committed the report (every rank's part is up: `get_all_reported_checkpoints(COMMITTED)`),
which rank 0 asks at the next checkpoint (so at most one upload is in flight) and at the end of the run, after the
export. A run killed in between has the checkpoint in Ray Train (a restarted attempt resumes from it) but not yet
its mark (`--resume` of a new run takes the one before).

A restore from remote storage (S3) fetches, per node, only what that node's ranks load: the files every rank reads
(the model states, ema.pt, DeepSpeed's `latest`) and each of its ranks' own (`*zero_pp_rank_<R>_*`, `rng-rank<R>.pt`).
DeepSpeed's ZeRO 1-3 without `elastic_checkpoint` reads only the rank's own optimizer shard
(`DeepSpeedEngine._get_all_zero_checkpoint_state_dicts`) and never checks the others exist. The node's lowest rank
downloads them into a folder of that node, once; every rank loads from it, and it is deleted after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def load_tensors(source, mmap: bool = False):
    """A checkpoint file (a path or a file object) of tensors and plain values, loaded on the CPU. Checkpoints
    come from a bucket that others can write: `weights_only` refuses any pickled object that would run code.
    `mmap` (a path only): the tensors stay in the file until read, so a rank that needs a slice of each never
    holds the whole."""
    import torch

    return torch.load(source, weights_only=True, map_location="cpu", mmap=mmap)


def rng_state(device) -> dict:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class RayTrainStorage:
    """Checkpoints of a run under Ray Train: `ray.train.report` copies each rank's folder into the run's checkpoint
    (RunConfig's storage, OUT/checkpoints/<run>/), and a restarted attempt is handed its last one. `upload`: sync
    (the report returns once this rank's folder is up) or async (in the background; see the module docstring)."""

    def __init__(self, upload: str = "sync"):
        if upload not in ("sync", "async"):
            raise ValueError(f"upload must be sync or async, got {upload!r}")
        self.upload = upload
        self.pending: list[tuple[str, dict]] = []  # async: (state.json's URI, its content), once committed

    @property
    def in_background(self) -> bool:
        return self.upload == "async"

    def publish(self, folder: Path, name: str, metrics: dict) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        mode = CheckpointUploadMode.ASYNC if self.in_background else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=name, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=self.in_background)

    def mark(self, uri: str, state: dict) -> None:
        """Rank 0: write the state.json mark at `uri` once the checkpoint is complete (async: once committed)."""
        if self.in_background:
            self.pending.append((uri, state))
        else:
            _write_mark(uri, state)

    def commit(self) -> None:
        """Rank 0: wait until Ray Train has committed every report so far, then write their marks."""
        if self.pending:
            import ray.train
            from ray.train import CheckpointConsistencyMode

            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            for uri, state in self.pending:
                _write_mark(uri, state)
            self.pending.clear()

    def run_name(self) -> str:
        import ray.train

        return ray.train.get_context().get_experiment_name()  # RunConfig.name: the folder under OUT/checkpoints

    def attempt(self):
        """This attempt's Ray Train checkpoint (after a worker failure), or None."""
        import ray.train

        return ray.train.get_checkpoint()


class FolderStorage:
    """Checkpoints of a run without Ray Train (one process): each folder copied to OUT/checkpoints/<run>/<name>/."""

    in_background = False  # `publish` returns once the copy is done

    def __init__(self, out: str, run: str = "local"):
        self.out, self.run = out, run

    def publish(self, folder: Path, name: str, metrics: dict) -> None:
        from emoji_ldm.store.artifacts import artifact_uri, upload_dir

        upload_dir(folder, f"{artifact_uri(self.out, 'checkpoints')}/{self.run}/{name}")

    def run_name(self) -> str:
        return self.run

    def attempt(self):
        return None

    def mark(self, uri: str, state: dict) -> None:
        _write_mark(uri, state)

    def commit(self) -> None:
        pass


def _write_mark(uri: str, state: dict) -> None:
    from emoji_ldm.store.artifacts import write_json

    write_json(uri, state)


def save(engine, counters: dict, meta: dict, *, out: str, rank: int, device, ema=None, log=None,
         metrics: dict | None = None, storage=None) -> None:
    """Every rank: its engine shard and RNG state, and its EMA partition gathered to rank 0, which writes the EMA
    and the logs. The storage (`RayTrainStorage` unless given) copies each rank's folder to the run's checkpoints as
    `step-XXXXXXXX`; once every rank's copy is done, rank 0 writes state.json there.

    state.json is not in rank 0's folder: the copy goes up one file at a time in the order the folder lists them
    (pyarrow's copy_files, single-threaded to S3), so a rank lost during the copy could leave a state.json beside a
    missing ema.pt or model states, and every restart would then load that checkpoint and fail."""
    import torch
    import torch.distributed as dist

    from emoji_ldm.store.artifacts import artifact_uri

    storage = storage or RayTrainStorage()
    if rank == 0:
        storage.commit()  # async: the previous checkpoint's upload is done (at most one in flight) and marked
    name = f"step-{counters['step']:08d}"
    folder = Path(tempfile.mkdtemp(prefix="emoji-ldm-ckpt-"))
    published = False
    try:
        engine.save_checkpoint(str(folder), tag="ds", client_state=dict(counters))
        torch.save(rng_state(device), folder / f"rng-rank{rank}.pt")
        ema_state = ema.state_dict() if ema is not None else None  # every rank: the partitions gathered to rank 0
        if rank == 0:
            if ema_state is not None:
                torch.save(ema_state, folder / "ema.pt")
            if log is not None:
                log.flush()
        storage.publish(folder, name, dict(metrics or {}, step=counters["step"]))
        published = True
    finally:
        if not (published and storage.in_background):  # an async upload reads it later, and deletes it
            shutil.rmtree(folder, ignore_errors=True)  # the storage has copied it
    if dist.is_initialized() and not storage.in_background:
        dist.barrier()  # every rank's copy is done: its part is in the storage
    if rank == 0:
        storage.mark(f"{artifact_uri(out, 'checkpoints')}/{storage.run_name()}/{name}/state.json", {**counters, **meta})


def open_checkpoint(uri: str):
    """A Ray Train `Checkpoint` at `uri` (local or s3://) on the project's filesystem, not pyarrow's default one."""
    import ray.train

    from emoji_ldm.store.uri import filesystem

    fs, path = filesystem(uri)
    return ray.train.Checkpoint(path, filesystem=fs)


def restore(engine, counters: dict, *, out: str, rank: int, device, ema=None, storage=None) -> str | None:
    """Load the run's newest checkpoint into the engine, the EMA, the RNG and `counters` (updated in place);
    returns where it came from, or None.

    After a worker failure that is Ray Train's checkpoint of this run, or a newer complete one under
    OUT/checkpoints: every rank uploads its part inside `ray.train.report`, but the controller registers a report
    only when it next polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), so a worker
    that dies within that window after a checkpoint would otherwise send the run back to the one before. On a
    first attempt OUT/checkpoints holds nothing (`runner.refuse_or_resume` refuses a new run into an OUT that has
    checkpoints) or the checkpoint `--resume` continues from."""
    import torch.distributed as dist

    checkpoint = (storage or RayTrainStorage()).attempt()  # the same on every rank
    if rank == 0:  # rank 0 lists, and every rank loads what it found (a listing elsewhere may be behind)
        newest = latest(out)
        if newest is not None and (checkpoint is None or _step(checkpoint.path) < newest[1]["step"]):
            checkpoint = open_checkpoint(newest[0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        # the Checkpoint itself: one id, so Ray downloads it once per node for the ranks there, not once per rank
        chosen = [checkpoint]
        dist.broadcast_object_list(chosen, src=0)
        checkpoint = chosen[0]
    if checkpoint is None:
        return None
    with _on_this_node(checkpoint, rank) as folder:
        _, client = engine.load_checkpoint(folder, tag="ds", load_lr_scheduler_states=True)
        counters.update({k: client[k] for k in counters})
        if ema is not None:  # every rank takes its partition of the full EMA, read from the file, not into memory
            ema.load_state_dict(load_tensors(Path(folder) / "ema.pt", mmap=True))
        set_rng_state(load_tensors(Path(folder) / f"rng-rank{rank}.pt"), device)
    return checkpoint.path


_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rng-rank(\d+)\.pt$")


def rank_of(name: str) -> int | None:
    """The rank whose file `name` (a checkpoint file's base name) is, or None for a file every rank reads."""
    found = _RANK_FILE.search(name)
    return None if found is None else int(found.group(1) or found.group(2))


def _node() -> str:
    """This worker's node: Ray's node id under Ray, else the host name."""
    import socket

    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


@contextlib.contextmanager
def _on_this_node(checkpoint, rank: int) -> Iterator[str]:
    """The checkpoint as a local folder holding what this node's ranks load (see the module docstring): the
    checkpoint's own folder when it is on a local filesystem; else a download by the node's lowest rank."""
    import pyarrow.fs as pafs
    import torch.distributed as dist

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    node = _node()
    ranks = [(node, rank)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, (node, rank))
    here = {r for other, r in ranks if other == node}
    # the same on every rank of the node, another on another node (two Ray nodes may share a host and its /tmp)
    key = hashlib.sha1(f"{checkpoint.path}\n{node}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"emoji-ldm-restore-{key}"
    try:
        if rank == min(here):
            shutil.rmtree(folder, ignore_errors=True)
            _download(checkpoint, folder, here)
        if dist.is_initialized():
            dist.barrier()  # the node's files are down
        yield str(folder)
        if dist.is_initialized():
            dist.barrier()  # every rank of the node has loaded
    finally:
        if rank == min(here):
            shutil.rmtree(folder, ignore_errors=True)


def _download(checkpoint, folder: Path, ranks: set[int]) -> None:
    """The checkpoint's files that `ranks` load, into `folder`, several at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    wanted = [i.path for i in infos if i.type == pafs.FileType.File and rank_of(i.base_name) in ranks | {None}]
    local = pafs.LocalFileSystem()

    def fetch(path: str) -> None:
        target = folder / path[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=local)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, wanted))


def _step(path: str) -> int:
    """The step of a checkpoint folder named `step-XXXXXXXX` (as `save` names them)."""
    return int(path.rstrip("/").rsplit("/", 1)[-1].removeprefix("step-"))


def latest(out: str) -> tuple[str, dict] | None:
    """(URI, state.json) of the newest complete checkpoint under OUT/checkpoints, if any: one with a state.json
    (`save` writes it once every rank has uploaded its part) that holds the RNG state of every rank and, under
    ZeRO 1-3, an optimizer shard from every rank."""
    import pyarrow.fs as pafs

    from emoji_ldm.store.artifacts import artifact_uri
    from emoji_ldm.store.uri import filesystem, is_s3

    fs, path = filesystem(artifact_uri(out, "checkpoints"))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return None
    found = []
    for info in infos:
        if info.path.endswith("/state.json") and "/step-" in info.path:
            folder = info.path.rsplit("/", 1)[0]
            with fs.open_input_stream(info.path) as f:
                state = json.loads(f.read())
            names = [i.base_name for i in infos if i.path.startswith(folder + "/")]
            shards = sum(1 for n in names if n.endswith("optim_states.pt"))
            rngs = sum(1 for n in names if n.startswith("rng-rank"))
            if rngs >= state["world_size"] and (shards >= state["world_size"] or state["zero_stage"] == 0):
                found.append((state["step"], ("s3://" + folder) if is_s3(out) else folder, state))
    if not found:
        return None
    _, folder, state = max(found, key=lambda f: f[0])
    return folder, state
