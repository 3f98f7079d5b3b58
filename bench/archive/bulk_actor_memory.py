"""Bulk's model actor outside Ray: private memory against images drawn, with or without malloc_trim per batch.

Issue 28: in `bench/scale_data.py`, bulk's model actor (a Ray Data actor running `BulkGenerator`) grew from
574 to 719 MiB private from 10k to 50k prompts (1.25x; 1.13x the day before). This runs the same class in one
plain process, on the same tiny model, with the CLI's batches (32 prompts, 1 image each, 2 steps), and prints
its private memory (RSS less shared pages, bench/common.py) every 800 images: if it stays flat here, what grows is
the actor's Ray context (Ray Data's batches, the core worker), not the sampler, the model or the PNG writer.

    .venv/bin/python bench/bulk_actor_memory.py --model RUN [--images 9600] [--trim]
    .venv/bin/python bench/bulk_actor_memory.py --model RUN --ray [--images 8000] [--trace] [--trim]
      RUN: a trained run folder, e.g. bench/scale_data.py's --work folder's run/ (`train --preset tiny`)

--ray runs the class as bulk does, a Ray Data actor (ActorPoolStrategy(size=1), batches of 32, a local
Ray), and samples the actor's private memory every 10 s from the driver instead. --ray --trace also has the
actor report, every 100 batches, what it holds: Python's heap (tracemalloc, and its largest growth since
batch 20), Arrow's pool, live Python objects, threads and memory maps; --ray --trim has the actor call
malloc_trim after every batch.

What it found (bench/HISTORY.md, 2026-11-25): Ray Data runs the actor's batches on a pool thread, whose glibc
heap kept what each batch freed (520 -> 685 MiB in 17 minutes; ~470 flat with --trim). Since `2d36d6b`
BulkGenerator trims after every batch itself (`emoji_ldm.runtime.heap.release_free_heap`), so --trim adds nothing
to --ray there: check out `af881d2` to see the growth.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import psutil
from common import TreeSampler, private_mib, write_record

from emoji_ldm.inference.bulk import BulkGenerator
from emoji_ldm.inference.settings import SamplerSettings
from emoji_ldm.runtime.heap import release_free_heap

BATCH = 32
SETTINGS = SamplerSettings(steps=2, count=1)  # the scale runs' bulk: `--per-prompt 1 --steps 2`


def prompt_batch(batch: dict) -> dict:
    """A batch of ids -> the actor's input: prompt ids and (distinct) prompts."""
    ids = batch["id"]
    return {"prompt_id": ids.astype(str), "prompt": np.array([f"a {i % 977} smiling cat number {i}" for i in ids])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=int, default=9600)
    parser.add_argument("--trim", action="store_true", help="glibc malloc_trim(0) after every batch")
    parser.add_argument("--ray", action="store_true", help="as a Ray Data actor, as bulk runs it")
    parser.add_argument("--trace", action="store_true", help="with --ray: the actor reports what it holds")
    args = parser.parse_args()
    if args.ray:
        return in_ray(args.model, args.images, args.trace, args.trim)
    out = tempfile.mkdtemp(prefix="emoji-ldm-actor-")
    generator = BulkGenerator(args.model, out, SETTINGS, "cpu", images_per_call=BATCH)
    start, series = time.time(), []  # (images, private MiB, seconds)
    print(f"{'images':>7} {'private MiB':>12} {'s':>5}   (malloc_trim: {'on' if args.trim else 'off'})")
    for first in range(0, args.images, BATCH):
        generator(prompt_batch({"id": np.arange(first, first + BATCH)}))
        if args.trim:
            release_free_heap()
        if (first // BATCH) % 25 == 0 or first + BATCH >= args.images:
            series.append((first + BATCH, private_mib(), time.time() - start))
            print("{:>7} {:>12.1f} {:>5.0f}".format(*series[-1]), flush=True)
    write_record("bulk_actor_memory", {"ray": False, "trim": args.trim, "series": series}, [])


def private_by_mapping(proc: psutil.Process) -> str:
    """Private (dirty + clean) MiB of the process by what is mapped: the heap, anonymous maps (other arenas,
    large mallocs, thread stacks), shared memory (the object store) and files (libraries)."""
    kinds: dict[str, float] = {}
    for m in proc.memory_maps(grouped=True):
        path = m.path
        kind = path if path in ("[heap]", "[stack]") else "anon" if not path or path.startswith("[anon") else \
            "shm" if path.startswith("/dev/shm") else "files"
        kinds[kind] = kinds.get(kind, 0) + (m.private_dirty + m.private_clean) / 2**20
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


class ProbedGenerator(BulkGenerator):
    """BulkGenerator as bulk runs it, optionally calling glibc's malloc_trim after every batch (`trim`) and
    reporting every 100 batches what its process holds besides the model (`trace`)."""

    def __init__(self, *args, trace: bool = False, trim: bool = False, **kwargs):
        import tracemalloc

        super().__init__(*args, **kwargs)
        self.trace, self.trim = trace, trim
        self.calls, self.base = 0, None
        if trace:
            tracemalloc.start(8)

    def __call__(self, batch: dict):
        out = super().__call__(batch)
        self.calls += 1
        if self.trim:
            release_free_heap()
        if self.trace:
            self.report()
        return out

    def report(self) -> None:
        import gc
        import threading
        import tracemalloc

        import pyarrow as pa

        if self.calls == 20:
            self.base = tracemalloc.take_snapshot()
        if self.calls % 100 or self.base is None:
            return
        proc = psutil.Process()
        traced, _ = tracemalloc.get_traced_memory()
        print(f"[trace] batch {self.calls}: private {private_mib(proc):.1f} MiB, python heap "
              f"{traced / 2**20:.1f} MiB (tracemalloc's own {tracemalloc.get_tracemalloc_memory() / 2**20:.1f}),"
              f" arrow pool {pa.total_allocated_bytes() / 2**20:.1f} MiB, {len(gc.get_objects())} objects, "
              f"{threading.active_count()} python threads, {proc.num_threads()} threads, "
              f"{len(proc.memory_maps(grouped=False))} maps; private by mapping: {private_by_mapping(proc)}",
              flush=True)
        for stat in tracemalloc.take_snapshot().compare_to(self.base, "traceback")[:3]:
            print(f"[trace]   {stat.size_diff / 2**10:+.0f} KiB in {stat.count_diff:+d} blocks: "
                  + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in stat.traceback[:4]), flush=True)


def in_ray(model: str, images: int, trace: bool = False, trim: bool = False) -> None:
    import ray.data

    from emoji_ldm.runtime.connect import ensure_ray

    ensure_ray()
    out, start, series = tempfile.mkdtemp(prefix="emoji-ldm-actor-"), time.time(), []  # (s, pid, private MiB)

    def watch(now: float, procs: list[dict]) -> None:
        for p in procs:
            if "Generator" in p["cmdline"]:
                series.append((now - start, p["pid"], p["private"] / 2**20))
                print("{:>5.0f} s  actor {}: {:.1f} MiB private".format(*series[-1]), flush=True)

    with TreeSampler(os.getpid(), watch, interval=10):
        rows = ray.data.range(images).map_batches(prompt_batch, batch_format="numpy").map_batches(
            ProbedGenerator, batch_size=BATCH, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
            fn_constructor_kwargs={"model": model, "images_uri": out, "settings": SETTINGS, "device": "cpu",
                                   "images_per_call": BATCH, "trace": trace, "trim": trim})
        drawn = sum(len(b["prompt_id"]) for b in rows.iter_batches(batch_size=512))
    print(f"{drawn} images in {time.time() - start:.0f} s")
    write_record("bulk_actor_memory", {"ray": True, "trace": trace, "trim": trim, "images": drawn, "series": series},
                 [])


if __name__ == "__main__":
    main()
