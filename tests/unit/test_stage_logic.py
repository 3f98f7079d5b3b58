"""Fast tests of logic that otherwise runs only inside long integration tests."""

from __future__ import annotations

import math
import subprocess
import sys

import pyarrow as pa
import pytest

from emoji_ldm.caption.prompt import clean_caption
from emoji_ldm.errors import UserError
from emoji_ldm.inference.sampler import SampleJob
from emoji_ldm.inference.settings import SamplerSettings
from emoji_ldm.ingest.tasks import KEY_SCHEMA, resolve_group
from emoji_ldm.models.presets import get_preset
from emoji_ldm.train.ldm import TrainConfig, _check_resume
from emoji_ldm.train.lr import preset_schedule


def _keys(rows: list[dict]) -> pa.Table:
    full = [{"source_url": None, "page_url": None, "_file": None, "_pos": None, "_from_table": False, **r}
            for r in rows]
    return pa.Table.from_pylist(full, schema=KEY_SCHEMA)


def test_build_keeps_the_first_of_each_id_and_drops_the_rest():
    group = _keys([{"id": "a", "source_url": "u1", "_file": "f1", "_pos": 7},
                   {"id": "a", "source_url": "u0", "_file": "f2", "_pos": 3},
                   {"id": "a", "source_url": "u2", "_file": "f2", "_pos": 4}])
    assert resolve_group(group).to_pylist() == [  # the smallest source URL stays
        {"_file": "f1", "_pos": 7, "_reason": "duplicate_in_build"},
        {"_file": "f2", "_pos": 4, "_reason": "duplicate_in_build"}]
    assert resolve_group(_keys([{"id": "b", "source_url": "u", "_file": "f", "_pos": 0}])).num_rows == 0


def test_small_builds_apply_the_same_rule_on_the_driver(tmp_path):
    import pyarrow.fs as pafs

    from emoji_ldm.ingest.build import _dedupe_small
    from emoji_ldm.ingest.tasks import DROP_SCHEMA
    from emoji_ldm.store.staging import folder_name, read_folder, write_atomic

    keys = _keys([{"id": "a", "source_url": "u1", "_file": "f1", "_pos": 0},
                  {"id": "a", "source_url": "u0", "_file": "f2", "_pos": 5},
                  {"id": "b", "source_url": "u2", "_file": "f1", "_pos": 1}])
    write_atomic(pafs.LocalFileSystem(), str(tmp_path / "keys"), keys, False)
    assert _dedupe_small(str(tmp_path / "ds"), str(tmp_path / "keys"), str(tmp_path / "drops"), False) == {
        "duplicate_in_build": 1}
    drops = tmp_path / "drops"
    assert read_folder(str(drops / folder_name("f1")), DROP_SCHEMA).to_pylist() == [
        {"_file": "f1", "_pos": 0, "_reason": "duplicate_in_build"}]
    assert read_folder(str(drops / folder_name("f2")), DROP_SCHEMA).num_rows == 0  # nothing staged: empty


def test_build_drops_rows_already_in_the_table():
    group = _keys([{"id": "old", "_from_table": True}, {"id": "old", "source_url": "u4", "_file": "f", "_pos": 1}])
    assert resolve_group(group).to_pylist() == [{"_file": "f", "_pos": 1, "_reason": "duplicate_in_table"}]
    assert resolve_group(_keys([{"id": "old", "_from_table": True}])).num_rows == 0


def test_shuffles_and_data_files_grow_in_number_not_in_size():
    from emoji_ldm.ingest.build import rows_per_file
    from emoji_ldm.runtime.partitions import PARTITION_BYTES, partitions_for

    assert partitions_for(0, cpus=2) == 4 and partitions_for(10**6, cpus=64) == 128  # two per CPU, 4 to 256
    assert partitions_for(10**6, cpus=1000) == 256
    # 1M and 100M keys of 250 bytes: the partitions grow 100x, each one stays at PARTITION_BYTES
    small, big = partitions_for(250 * 10**6, cpus=2), partitions_for(250 * 10**8, cpus=2)
    assert big == 100 * small or abs(big / small - 100) < 1
    assert 250 * 10**8 / big <= PARTITION_BYTES
    assert partitions_for(10**15, cpus=2) == 16_384  # the cap
    assert rows_per_file(64) == 20_000 and rows_per_file(128) == 5_000 and rows_per_file(1024) == 256


# A thread (as Ray runs an actor's calls) fills a glibc heap with 64 KiB blocks and frees every other one: the
# holes stay in the process until something trims them. Run in its own interpreter, whose heap is only this.
HOLES = r"""
import ctypes, sys, threading
import psutil
from emoji_ldm.runtime.heap import release_free_heap

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def fill():
    blocks = [libc.malloc(64 * 1024) for _ in range(3000)]  # ~190 MiB, under glibc's mmap threshold
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    for b in blocks[::2]:
        libc.free(b)

def private():
    m = psutil.Process().memory_info()
    return (m.rss - m.shared) / 2**20

t = threading.Thread(target=fill)
t.start()
t.join()
before = private()
release_free_heap()
print(before, private())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_release_free_heap_hands_freed_pages_back():
    """A long-lived model actor frees its activations into glibc's heaps, which keep them; release_free_heap
    hands the freed pages back (bench/bulk_actor_memory.py measures it on bulk's actor)."""
    out = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True).stdout
    before, after = map(float, out.split())
    assert before - after > 60, f"private memory {before:.0f} -> {after:.0f} MiB: the freed half (~94 MiB) stayed"


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    preset = get_preset("tiny", {"train.lr": 1e-3, "train.min_lr": 1e-4, "train.warmup_steps": 10,
                                 "train.max_steps": 110})
    f = preset_schedule(preset)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # floor = min_lr / lr


def test_resume_refuses_another_model_or_another_world():
    preset = get_preset("tiny")
    state = {"preset": preset.to_dict(), "world_size": 2, "zero_stage": 2}
    config = TrainConfig(data="/d", out="/o", zero_stage=2)
    _check_resume(state, preset, config)  # same everything: fine
    _check_resume(state, get_preset("tiny", {"train.lr": 1.0}), config)  # the optimiser recipe may change
    with pytest.raises(UserError, match="different unet config"):
        _check_resume(state, get_preset("tiny", {"unet.layers_per_block": 2}), config)
    with pytest.raises(UserError, match="--workers 2 --zero-stage 2"):
        _check_resume(state, preset, TrainConfig(data="/d", out="/o", workers=1, overrides={"train.batch_size": 63}))


def test_sample_job_splits_keep_each_image_with_its_seed():
    job = SampleJob.of(("a", "b", "c", "d", "e"), (10, 11, 12, 13, 14), SamplerSettings(steps=7, size=64))
    pieces = job.split(2)
    assert [p.prompts for p in pieces] == [("a", "b"), ("c", "d"), ("e",)]
    assert [p.seeds for p in pieces] == [(10, 11), (12, 13), (14,)]
    assert all(p.settings == (7, None, "dpmpp", 64, None) for p in pieces)  # (steps, guidance, sampler, size, adapter)
    mine = SampleJob.of(("a",), (1,), SamplerSettings(steps=7, size=64), adapter="my-cat")
    assert mine.settings != pieces[0].settings  # another adapter: another pipeline call
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        SampleJob(("a", "b"), (1,))


@pytest.mark.parametrize("raw, clean", [
    ("<|im_start|>assistant\nA red heart.<|im_end|>", "A red heart."),
    ('  "a smiling\n cat face"  ', "a smiling cat face"),
    ("`pizza slice`", "pizza slice"),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_caption_cuts_at_a_word():
    text = clean_caption("word " * 100, limit=23)
    assert text == "word word word word" and len(text) <= 23
