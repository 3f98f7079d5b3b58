"""Latent tables: what `encode` writes and `train` and `eval` read, and the per-rank training stream.

A latent table is a Delta table partitioned by `split` (`train` | `val`, 10%
held out by content hash), one row per image: `id`, `caption`, `latent`
(float16 bytes of `latent_shape` (C, h, w), already times the VAE scaling
factor), `text_emb` (float16 bytes of `text_shape` (L, D)). Its encode commit
records the dataset URI + version and the encoder ids; the empty-caption
embedding (caption dropout) is stored beside it in `_emoji_ldm/empty_caption.npz`.

Training reads it as deterministic per-rank shards (`RankStream`), not through
Ray Data's `streaming_split`. Why: an epoch's order is then a pure function
of (seed, epoch, rank), so a resumed run skips the batches already consumed
and continues exactly as if it had never stopped (bit-identical weights and
optimizer state), which a dynamic split cannot promise. Per epoch:

1. the table's training files (Delta add actions of `split=train`, with their
   row counts from the log: no scan) are permuted by (seed, epoch);
2. their rows, concatenated in that order, are cut into `world` equal
   ranges; rank r reads only the files that overlap range r, row group by
   row group (every rank the same number of rows, so the same number of steps
   and no collective waits on a rank that ran dry);
3. rows pass through a shuffle buffer of `shuffle_buffer` rows (seeded per
   rank and epoch) and come out as micro-batches, prefetched by a thread.

Memory per worker: the shuffle buffer, one row group and the prefetched
batches, whatever the table's size. The files are on shared storage (S3 on a
cluster), so a worker on any node reads its own range.
"""

from __future__ import annotations

import io
import queue
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from emoji_ldm.errors import UserError

LATENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),  # the partition column: train | val
        ("latent", pa.binary()),  # float16, latent_shape (C, h, w), already x scaling factor
        ("latent_shape", pa.list_(pa.int32())),
        ("text_emb", pa.binary()),  # float16, text_shape (L, D)
        ("text_shape", pa.list_(pa.int32())),
    ]
)
PARTITION = "split"
_TENSOR_COLUMNS = ["latent", "latent_shape", "text_emb", "text_shape"]


def open_latent_table(data: str):
    """(ref, table at the referenced version, that version's encode commit metadata) of a latent table."""
    from emoji_ldm.store.delta import commit_metadata, open_table
    from emoji_ldm.store.uri import DatasetRef

    ref = DatasetRef.parse(data)
    table = open_table(ref)
    meta = commit_metadata(table)
    if meta.get("operation") != "encode":
        raise UserError(f"{data!r} is not a latent table: run `emoji-ldm encode` first")
    return ref, table, meta


def encoded_dataset(enc_meta: dict) -> str | None:
    """The absolute URI of the dataset a latent table was encoded from: its encode commit's `source`
    (`URI@VERSION`, always resolved), since older encodes stored `dataset` as typed (maybe relative)."""
    from emoji_ldm.store.uri import public_uri

    source = enc_meta.get("source") or ""
    uri = source.rsplit("@", 1)[0] if "@" in source else enc_meta.get("dataset")
    return public_uri(uri) if uri else None


def empty_caption(uri: str) -> np.ndarray:
    """The text embedding of "" stored beside the latent table at `uri`, (L, D) float16."""
    from emoji_ldm.store.artifacts import artifact_uri, read_bytes

    return np.load(io.BytesIO(read_bytes(artifact_uri(uri, "_emoji_ldm", "empty_caption.npz"))))["emb"]


def decode_latents(batch: dict) -> dict:
    """Float16 bytes -> fixed-shape arrays: latent (B, C, h, w), text_emb (B, L, D)."""
    shape = tuple(batch["latent_shape"][0])
    tshape = tuple(batch["text_shape"][0])
    return {
        **({"id": batch["id"]} if "id" in batch else {}),
        "latent": np.stack([np.frombuffer(b, dtype=np.float16).reshape(shape) for b in batch["latent"]]),
        "text_emb": np.stack([np.frombuffer(b, dtype=np.float16).reshape(tshape) for b in batch["text_emb"]]),
    }


@dataclass(frozen=True)
class SplitFile:
    uri: str  # a Parquet data file of the table
    rows: int  # from the Delta log's stats


def split_files(table, split: str = "train") -> list[SplitFile]:
    """The data files of one split at the table's loaded version, in log order, with their row counts.

    Reads only the Delta log (one entry per file, never a row), so it costs
    O(files); tables written before latent tables were partitioned by split
    are refused with the command that rewrites them.
    """
    from emoji_ldm.store.uri import join

    if PARTITION not in (table.metadata().partition_columns or []):
        raise UserError(f"the latent table {table.table_uri!r} is not partitioned by split (an older emoji-ldm "
                        "wrote it): run `emoji-ldm encode --full` again to rewrite it")
    actions = pa.table(table.get_add_actions(flatten=True))
    mine = actions.filter(pc.equal(actions.column(f"partition.{PARTITION}"), split))
    counts = mine.column("num_records").to_pylist()
    if any(c is None for c in counts):
        raise UserError(f"the latent table {table.table_uri!r} has files without row counts in its log: "
                        "run `emoji-ldm encode --full` again to rewrite it")
    return [SplitFile(join(table.table_uri, p), int(n)) for p, n in zip(mine.column("path").to_pylist(), counts)]


def epoch_ranges(files: list[SplitFile], world: int, seed: int, epoch: int) -> list[list[tuple[int, int, int]]]:
    """For every rank: (file index, first row, end row) pieces of its equal share of this epoch's rows."""
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    per_rank = sum(f.rows for f in files) // world
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    offset = 0  # rows of the epoch's concatenation before this file
    for i in order:
        rows = files[i].rows
        for rank in range(world):
            lo, hi = max(rank * per_rank, offset), min((rank + 1) * per_rank, offset + rows)
            if lo < hi:
                ranges[rank].append((int(i), lo - offset, hi - offset))
        offset += rows
    return ranges


class RankStream:
    """This rank's micro-batches of one epoch: the deterministic order described in the module docstring."""

    def __init__(self, files: list[SplitFile], rank: int, world: int, micro: int, seed: int,
                 shuffle_buffer: int = 2048, prefetch: int = 4, read_rows: int = 256):
        if micro < 1 or shuffle_buffer < 1:
            raise ValueError(f"micro batch {micro} and shuffle buffer {shuffle_buffer} must be positive")
        self.files, self.rank, self.world, self.micro, self.seed = files, rank, world, micro, seed
        self.shuffle_buffer, self.prefetch, self.read_rows = shuffle_buffer, prefetch, read_rows
        self.batches_per_epoch = sum(f.rows for f in files) // world // micro

    def epoch(self, epoch: int, skip: int = 0):
        """Micro-batches `skip`.. of `epoch` as dicts of float16 arrays: latent (B, C, h, w), text_emb (B, L, D)."""
        source = self._batches(epoch)
        for _ in range(skip):  # the same order as before the restart: drop what was already trained on
            next(source, None)
        return _prefetched(source, self.prefetch)

    def _rows(self, epoch: int):
        """(latent, text_emb) per row of this rank's range, in file order."""
        import pyarrow.parquet as pq

        from emoji_ldm.store.uri import filesystem

        for index, first, end in epoch_ranges(self.files, self.world, self.seed, epoch)[self.rank]:
            fs, path = filesystem(self.files[index].uri)
            with fs.open_input_file(path) as f:
                at = 0  # row number of the batch's first row in the file
                for batch in pq.ParquetFile(f).iter_batches(batch_size=self.read_rows, columns=_TENSOR_COLUMNS):
                    lo, hi = max(first - at, 0), min(end - at, batch.num_rows)
                    at += batch.num_rows
                    if lo >= hi:
                        if at >= end:
                            break
                        continue
                    part = decode_latents(batch.slice(lo, hi - lo).to_pydict())
                    yield from zip(part["latent"], part["text_emb"])
                    if at >= end:
                        break

    def _batches(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        buffer: list[tuple[np.ndarray, np.ndarray]] = []
        batch: list[tuple[np.ndarray, np.ndarray]] = []
        produced = 0

        def take():  # one random row out of the buffer (swap with the last, pop)
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            return buffer.pop()

        rows = self._rows(epoch)
        for row in rows:
            buffer.append(row)
            if len(buffer) < self.shuffle_buffer:
                continue
            batch.append(take())
            if len(batch) == self.micro:
                yield _stack(batch)
                batch, produced = [], produced + 1
                if produced == self.batches_per_epoch:
                    return
        while buffer and produced < self.batches_per_epoch:
            batch.append(take())
            if len(batch) == self.micro:
                yield _stack(batch)
                batch, produced = [], produced + 1


def _stack(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    return {"latent": np.stack([r[0] for r in rows]), "text_emb": np.stack([r[1] for r in rows])}


_END = object()


def _prefetched(source, depth: int):
    """Run `source` in a thread, at most `depth` items ahead (decoding overlaps the training step)."""
    if depth <= 0:
        yield from source
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run():
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=run, daemon=True, name="latent-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
