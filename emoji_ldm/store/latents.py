"""Latent tables: what `encode` writes and `train` and `eval` read, and the per-rank training stream.

A latent table is a Delta table partitioned by `split` (`train` | `val`, 10%
held out by content hash), one row per image: `id`, `caption`, `latent`
(float16 bytes of `latent_shape` (C, h, w), already times the VAE scaling
factor), `text_emb` (float16 bytes of `text_shape`: (L, D), or (K, L, D) for K
forms of the caption, the caption first: `inference.prompts.caption_forms`;
training draws one per image and step). Its encode commit records the dataset
URI + version, the encoder ids and `text_forms` (K); the empty-caption
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
import pyarrow.parquet as pq

from emoji_ldm.errors import UserError
from emoji_ldm.store.artifacts import artifact_uri, read_bytes
from emoji_ldm.store.uri import DatasetRef, filesystem, join, public_uri

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
    from emoji_ldm.store.delta import commit_metadata, open_table  # Ray Data's Datasink: heavy

    ref = DatasetRef.parse(data)
    table = open_table(ref)
    meta = commit_metadata(table)
    if meta.get("operation") != "encode":
        raise UserError(f"{data!r} is not a latent table: run `emoji-ldm encode` first")
    return ref, table, meta


def encoded_dataset(enc_meta: dict) -> str | None:
    """The absolute URI of the dataset a latent table was encoded from: its encode commit's `source`
    (`URI@VERSION`); None when the commit names none."""
    source = enc_meta.get("source") or ""
    return public_uri(source.rsplit("@", 1)[0]) if "@" in source else None


def empty_caption(uri: str) -> np.ndarray:
    """The text embedding of "" stored beside the latent table at `uri`, (L, D) float16."""
    return np.load(io.BytesIO(read_bytes(artifact_uri(uri, "_emoji_ldm", "empty_caption.npz"))))["emb"]


def decode_latents(batch: dict) -> dict:
    """Float16 bytes -> fixed-shape arrays: latent (B, C, h, w), text_emb (B, L, D) or (B, K, L, D)."""
    shape = tuple(batch["latent_shape"][0])
    tshape = tuple(batch["text_shape"][0])
    return {
        **({"id": batch["id"]} if "id" in batch else {}),
        "latent": np.stack([np.frombuffer(b, dtype=np.float16).reshape(shape) for b in batch["latent"]]),
        "text_emb": np.stack([np.frombuffer(b, dtype=np.float16).reshape(tshape) for b in batch["text_emb"]]),
    }


def own_caption(text_emb: np.ndarray) -> np.ndarray:
    """The embeddings of the captions themselves, (B, L, D), from a decoded `text_emb` of any number of forms."""
    return text_emb[:, 0] if text_emb.ndim == 4 else text_emb


@dataclass(frozen=True)
class SplitFile:
    uri: str  # a Parquet data file of the table
    rows: int  # from the Delta log's stats


def split_files(table, split: str = "train") -> list[SplitFile]:
    """The data files of one split at the table's loaded version, in log order, with their row counts.

    Reads only the Delta log (one entry per file, never a row), so it costs
    O(files): `encode` partitions the table by split and records each file's row count.
    """
    actions = pa.table(table.get_add_actions(flatten=True))
    mine = actions.filter(pc.equal(actions.column(f"partition.{PARTITION}"), split))
    counts = mine.column("num_records").to_pylist()
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
        """Micro-batches `skip`.. of `epoch` as dicts of float16 arrays: latent (B, C, h, w), text_emb (B, [K,] L, D).

        The same order as a run that never stopped. The `skip` batches already trained on are not read: the
        shuffle is replayed on row numbers alone, then only the rows still in the shuffle buffer are read back,
        and the stream goes on from the first unread row, whole files and row groups before it skipped."""
        return _prefetched(self._batches(epoch, skip), self.prefetch)

    def _pieces(self, epoch: int) -> list[tuple[int, int, int, int]]:
        """(file index, first row, end row, position of the first row in this rank's stream) of this epoch."""
        pieces, at = [], 0
        for index, first, end in epoch_ranges(self.files, self.world, self.seed, epoch)[self.rank]:
            pieces.append((index, first, end, at))
            at += end - first
        return pieces

    def _rows(self, pieces, start: int = 0):
        """(latent, text_emb) per row of this rank's stream from position `start` on, in file order."""
        for index, first, end, at in pieces:
            if at + (end - first) <= start:
                continue  # a whole file before the start: not opened
            yield from self._read(index, first + max(0, start - at), end)

    def _read(self, index: int, first: int, end: int, wanted=None):
        """Rows first..end-1 of one file (only those in the sorted list `wanted` when given), streamed in batches
        of `read_rows` from the first row group that holds them on."""
        fs, path = filesystem(self.files[index].uri)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            groups, at = [], 0  # at: the file row of the first row group read
            for g in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(g).num_rows
                if at + rows <= first and not groups:
                    at += rows  # a row group before the first row: not read
                    continue
                groups.append(g)
            for batch in parquet.iter_batches(batch_size=self.read_rows, row_groups=groups, columns=_TENSOR_COLUMNS):
                lo, hi = max(first - at, 0), min(end - at, batch.num_rows)
                if lo < hi:
                    part = batch.slice(lo, hi - lo)
                    if wanted is not None:
                        part = part.take(pa.array([r - at - lo for r in wanted if at + lo <= r < at + hi], pa.int64()))
                    if part.num_rows:
                        decoded = decode_latents(part.to_pydict())
                        yield from zip(decoded["latent"], decoded["text_emb"])
                at += batch.num_rows
                if at >= end:
                    break

    def _rows_at(self, pieces, positions: list[int]) -> dict:
        """{position: (latent, text_emb)} of the given stream positions (the shuffle buffer at a resume)."""
        found, wanted = {}, sorted(positions)
        for index, first, end, at in pieces:
            mine = [p for p in wanted if at <= p < at + (end - first)]
            if mine:
                rows = self._read(index, first + mine[0] - at, first + mine[-1] - at + 1,
                                  wanted=[first + p - at for p in mine])
                found.update(zip(mine, rows))
        return found

    def _batches(self, epoch: int, skip: int = 0):
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        pieces = self._pieces(epoch)
        total = sum(end - first for _, first, end, _ in pieces)
        buffer: list = []
        batch: list = []
        produced = 0

        def take():  # one random row out of the buffer (swap with the last, pop)
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            return buffer.pop()

        # Replay the shuffle of the skipped batches on row positions: the same draws, no rows read.
        position = 0
        while produced < min(skip, self.batches_per_epoch):
            if position < total:
                buffer.append(position)
                position += 1
                if len(buffer) < self.shuffle_buffer:
                    continue
            elif not buffer:
                break
            take()
            if len(batch) + 1 == self.micro:
                batch, produced = [], produced + 1
            else:
                batch.append(None)
        if skip:
            rows = self._rows_at(pieces, buffer)
            buffer = [rows[p] for p in buffer]

        for row in self._rows(pieces, position):
            if produced >= self.batches_per_epoch:
                return
            buffer.append(row)
            if len(buffer) < self.shuffle_buffer:
                continue
            batch.append(take())
            if len(batch) == self.micro:
                yield _stack(batch)
                batch, produced = [], produced + 1
        while buffer and produced < self.batches_per_epoch:
            batch.append(take())
            if len(batch) == self.micro:
                yield _stack(batch)
                batch, produced = [], produced + 1


def _stack(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    return {"latent": np.stack([r[0] for r in rows]), "text_emb": np.stack([r[1] for r in rows])}


_END = object()


def _prefetched(source, depth: int):
    """Run `source` in a thread, at most `depth` items ahead (decoding overlaps the training step). When the
    consumer stops early, the thread stops too: no put blocks on a full queue, and `source` is closed (its
    open file and S3 handle with it)."""
    if depth <= 0:
        yield from source
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # re-raised in the consumer
            put(e)
        finally:
            source.close()

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
        thread.join(timeout=5)
