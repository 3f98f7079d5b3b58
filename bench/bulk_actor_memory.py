"""Bulk's model actor outside Ray: private memory against images drawn, with or without malloc_trim per batch.

Issue 28: in `bench/scale_data.py`, bulk's model actor (a Ray Data actor running `BulkGenerator`) grew from
574 to 719 MiB private from 10k to 50k prompts (1.25x; 1.13x the day before). This runs the same class in one
plain process, on the same tiny model, with the CLI's batches (32 prompts, 1 image each, 2 steps), and prints
its private memory (RSS less shared pages, psutil) every 800 images: if it stays flat here, what grows is
the actor's Ray context (Ray Data's batches, the core worker), not the sampler, the model or the PNG writer.

    .venv/bin/python bench/bulk_actor_memory.py --model RUN [--images 9600] [--trim]
    .venv/bin/python bench/bulk_actor_memory.py --model RUN --ray [--images 8000]
      RUN: a trained run folder, e.g. bench/scale_data.py's --work folder's run/ (`train --preset tiny`)

--ray runs the class as bulk does, a Ray Data actor (ActorPoolStrategy(size=1), batches of 32, a local
Ray), and samples the actor's private memory every 10 s from the driver instead.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time

import numpy as np
import psutil

from emoji_ldm.inference.settings import SamplerSettings
from emoji_ldm.serve.bulk import BulkGenerator

BATCH = 32
SETTINGS = SamplerSettings(steps=2, count=1)  # the scale runs' bulk: `--per-prompt 1 --steps 2`


def prompt_batch(batch: dict) -> dict:
    """A batch of ids -> the actor's input: prompt ids and (distinct) prompts."""
    ids = batch["id"]
    return {"prompt_id": ids.astype(str), "prompt": np.array([f"a {i % 977} smiling cat number {i}" for i in ids])}


def private_mib(proc: psutil.Process) -> float:
    m = proc.memory_info()
    return (m.rss - m.shared) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=int, default=9600)
    parser.add_argument("--trim", action="store_true", help="glibc malloc_trim(0) after every batch")
    parser.add_argument("--ray", action="store_true", help="as a Ray Data actor, as bulk runs it")
    args = parser.parse_args()
    if args.ray:
        return in_ray(args.model, args.images)
    out = tempfile.mkdtemp(prefix="emoji-ldm-actor-")
    generator = BulkGenerator(args.model, out, SETTINGS, "cpu", images_per_call=BATCH)
    libc, proc, start = ctypes.CDLL("libc.so.6"), psutil.Process(), time.time()
    print(f"{'images':>7} {'private MiB':>12} {'s':>5}   (malloc_trim: {'on' if args.trim else 'off'})")
    for first in range(0, args.images, BATCH):
        generator(prompt_batch({"id": np.arange(first, first + BATCH)}))
        if args.trim:
            libc.malloc_trim(0)
        if (first // BATCH) % 25 == 0 or first + BATCH >= args.images:
            print(f"{first + BATCH:>7} {private_mib(proc):>12.1f} {time.time() - start:>5.0f}", flush=True)


def in_ray(model: str, images: int) -> None:
    import threading

    import ray.data

    from emoji_ldm.runtime import ensure_ray

    ensure_ray()
    out, start, done = tempfile.mkdtemp(prefix="emoji-ldm-actor-"), time.time(), threading.Event()

    def watch() -> None:
        while not done.wait(10):
            for p in psutil.Process().children(recursive=True):
                try:
                    if "BulkGenerator" in " ".join(p.cmdline()):
                        print(f"{time.time() - start:>5.0f} s  actor {p.pid}: {private_mib(p):.1f} MiB private",
                              flush=True)
                except psutil.Error:
                    pass

    threading.Thread(target=watch, daemon=True).start()
    rows = ray.data.range(images).map_batches(prompt_batch, batch_format="numpy").map_batches(
        BulkGenerator, batch_size=BATCH, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"model": model, "images_uri": out, "settings": SETTINGS,
                               "device": "cpu", "images_per_call": BATCH})
    drawn = sum(len(b["prompt_id"]) for b in rows.iter_batches(batch_size=512))
    done.set()
    print(f"{drawn} images in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
