"""Bulk's model actor outside Ray: private memory against images drawn, with or without malloc_trim per batch.

Issue 28: in `bench/scale_data.py`, bulk's model actor (a Ray Data actor running `BulkGenerator`) grew from
574 to 719 MiB private from 10k to 50k prompts (1.25x; 1.13x the day before). This runs the same class in one
plain process, on the same tiny model, with the CLI's batches (32 prompts, 1 image each, 2 steps), and prints
its private memory (RSS less shared pages, psutil) every 800 images: if it stays flat here, what grows is
the actor's Ray context (Ray Data's batches, the core worker), not the sampler, the model or the PNG writer.

    .venv/bin/python bench/bulk_actor_memory.py --model RUN [--images 9600] [--trim]
      RUN: a trained run folder, e.g. bench/scale_data.py's --work folder's run/ (`train --preset tiny`)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=int, default=9600)
    parser.add_argument("--trim", action="store_true", help="glibc malloc_trim(0) after every batch")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="emoji-ldm-actor-")
    generator = BulkGenerator(args.model, out, SamplerSettings(steps=2, count=1), "cpu", images_per_call=BATCH)
    libc, proc, start = ctypes.CDLL("libc.so.6"), psutil.Process(), time.time()

    def private_mib() -> float:
        m = proc.memory_info()
        return (m.rss - m.shared) / 2**20

    print(f"{'images':>7} {'private MiB':>12} {'s':>5}   (malloc_trim: {'on' if args.trim else 'off'})")
    for first in range(0, args.images, BATCH):
        ids = np.arange(first, first + BATCH)
        prompts = np.array([f"a {i % 977} smiling cat number {i}" for i in ids])
        generator({"prompt_id": ids.astype(str), "prompt": prompts})
        if args.trim:
            libc.malloc_trim(0)
        if (first // BATCH) % 25 == 0 or first + BATCH >= args.images:
            print(f"{first + BATCH:>7} {private_mib():>12.1f} {time.time() - start:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
