"""The latent stream a training rank reads: a resume mid-epoch continues the same order without reading the
rows it skips, and a consumer that stops early leaves no reader thread behind."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emoji_ldm.store.latents import RankStream, SplitFile


def _files(folder, sizes, row_group=7) -> list[SplitFile]:
    """Parquet files of latent rows whose values are their global row number (so batches can be compared)."""
    files, n = [], 0
    for k, rows in enumerate(sizes):
        ids = np.arange(n, n + rows)
        n += rows
        table = pa.table({
            "latent": [np.full((1, 2, 2), i, np.float16).tobytes() for i in ids],
            "latent_shape": [[1, 2, 2]] * rows,
            "text_emb": [np.full((2, 3), i, np.float16).tobytes() for i in ids],
            "text_shape": [[2, 3]] * rows,
        })
        path = folder / f"part-{k}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        files.append(SplitFile(str(path), rows))
    return files


def _ids(batches) -> list[list[int]]:
    return [b["latent"][:, 0, 0, 0].astype(int).tolist() for b in batches]


@pytest.mark.parametrize("world,micro,buffer", [(1, 4, 1), (2, 3, 5), (2, 4, 32), (3, 2, 200)])
def test_resume_mid_epoch_is_the_same_order(tmp_path, world, micro, buffer):
    files = _files(tmp_path, [40, 13, 27, 60])
    for rank in range(world):
        stream = RankStream(files, rank, world, micro, seed=3, shuffle_buffer=buffer, prefetch=2, read_rows=5)
        full = _ids(stream.epoch(1))
        assert len(full) == stream.batches_per_epoch
        for skip in (1, len(full) // 2, len(full) - 1, len(full)):
            assert _ids(stream.epoch(1, skip=skip)) == full[skip:], (rank, skip)


def test_resume_does_not_read_the_skipped_files(tmp_path, monkeypatch):
    files = _files(tmp_path, [50, 50, 50, 50])
    stream = RankStream(files, 0, 1, 5, seed=0, shuffle_buffer=4, prefetch=0)
    read = []
    original = RankStream._read

    def spy(self, index, first, end, wanted=None):
        read.append((index, first, end, wanted is not None))
        return original(self, index, first, end, wanted)

    monkeypatch.setattr(RankStream, "_read", spy)
    full = _ids(stream.epoch(0))
    read.clear()
    assert _ids(stream.epoch(0, skip=30)) == full[30:]  # 150 of 200 rows trained on
    rows_read = sum(end - first for _, first, end, wanted in read if not wanted)
    assert rows_read <= 50 + 4 + 1  # the rest of the epoch and the shuffle buffer's neighbourhood, no more


def test_stopping_early_leaves_no_reader_thread(tmp_path, monkeypatch):
    """3 batches, 2 prefetched: after the consumer takes one and stops, the reader has filled the queue and waits
    to put its end marker. It must stop rather than wait for ever (with its open file)."""
    import queue
    import types

    from emoji_ldm.store import latents

    full = threading.Event()

    class Watched(queue.Queue):
        def put(self, item, block=True, timeout=None):
            if self.full():
                full.set()  # the reader waits on a full queue
            super().put(item, block, timeout)

    monkeypatch.setattr(latents, "queue", types.SimpleNamespace(Queue=Watched, Full=queue.Full))
    files = _files(tmp_path, [6])
    stream = RankStream(files, 0, 1, 2, seed=0, shuffle_buffer=1, prefetch=2)
    before = {t.ident for t in threading.enumerate()}
    batches = stream.epoch(0)
    next(batches)
    (reader,) = [t for t in threading.enumerate() if t.name == "latent-prefetch" and t.ident not in before]
    assert full.wait(timeout=30), "the reader never filled the queue"
    batches.close()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the reader thread still waits after the consumer stopped"
