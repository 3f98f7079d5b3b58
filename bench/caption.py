"""Captioning benchmark, all in one run on this machine.

  1. the `metadata` captioner over the whole Twemoji dataset: rows/s of `emoji-ldm
     dataset caption` end to end (Ray start, read, caption, Delta merge) and of the
     captioning function alone.
  2. a tiny randomly initialised Qwen2.5-VL (the test fixture's model; it proves the
     code path, not caption quality), same model and settings on both sides:
       seed loop: one `generate` call per row in a Python for-loop (what the seed did);
       ours:      `emoji-ldm dataset caption --captioner qwen2.5-vl` (Ray Data actor,
                  left-padded batches of 16), and the same batched captioner in-process.

    python bench/caption.py [--rows 128] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import REPO, row, timed, write_record

sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128, help="rows for the Qwen comparison")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    from emoji_ldm.caption.metadata import caption_batch
    from emoji_ldm.caption.prompt import DEFAULT_TEMPLATE
    from emoji_ldm.caption.qwen import QwenCaptioner
    from emoji_ldm.caption.stage import CaptionConfig, caption_dataset
    from emoji_ldm.ingest.build import BuildConfig, build_dataset
    from emoji_ldm.store.delta import open_table
    from tests.tiny_models import tiny_qwen25_vl

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    results = {}

    data = str(work / "twemoji")
    build_dataset(BuildConfig(source="twemoji", out=data))
    rows = open_table(data).to_pyarrow_table(columns=["id", "image", "title", "tag"])
    n = rows.num_rows

    e2e, summary = timed(caption_dataset, CaptionConfig(dataset=data, captioner="metadata"))
    alone, _ = timed(caption_batch, {k: rows.column(k).to_pylist() for k in ("id", "image", "title", "tag")})
    results["metadata"] = {"rows": n, "captioned": summary["captioned"], "end_to_end_s": e2e,
                           "end_to_end_rows_per_s": n / e2e, "function_rows_per_s": n / alone}
    print(f"metadata: {n} rows, end to end {e2e:.1f} s = {n / e2e:.0f} rows/s; the function alone "
          f"{n / alone:.0f} rows/s", flush=True)

    model = str(tiny_qwen25_vl(work / "tiny-qwen"))
    sub = rows.slice(0, args.rows)
    pictures_png, titles = sub.column("image").to_pylist(), sub.column("title").to_pylist()
    from io import BytesIO

    from PIL import Image

    captioner = QwenCaptioner(model, DEFAULT_TEMPLATE, max_new_tokens=args.max_new_tokens)
    pictures = [Image.open(BytesIO(p)).convert("RGB") for p in pictures_png]
    captioner.generate(pictures[:2], titles[:2])  # warm-up

    seed_s, _ = timed(lambda: [captioner.generate([picture], [title])  # the seed: one generate call per row
                               for picture, title in zip(pictures, titles)])
    batched_s, _ = timed(lambda: [captioner.generate(pictures[i:i + args.batch_size], titles[i:i + args.batch_size])
                                  for i in range(0, len(pictures), args.batch_size)])

    qdata = str(work / "qwen-ds")
    build_dataset(BuildConfig(source="twemoji", out=qdata, limit=args.rows))
    ours_s, q = timed(caption_dataset, CaptionConfig(dataset=qdata, captioner="qwen2.5-vl", model=model,
                                                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens))
    m = args.rows
    results["qwen_tiny"] = {"rows": m, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                            "seed_loop_rows_per_s": m / seed_s, "batched_in_process_rows_per_s": m / batched_s,
                            "ours_ray_end_to_end_rows_per_s": q["todo"] / ours_s, "ours_ray_s": ours_s}
    print(f"tiny qwen, {m} rows, {args.max_new_tokens} new tokens: seed loop {m / seed_s:.1f} rows/s; batched "
          f"(batch {args.batch_size}) in-process {m / batched_s:.1f} rows/s = {seed_s / batched_s:.2f}x; "
          f"`dataset caption` on Ray end to end {m / ours_s:.1f} rows/s = {seed_s / ours_s:.2f}x", flush=True)
    write_record("caption", results, [
        row("caption", f"`metadata` captioner, `dataset caption` end to end, {n:,} rows", n / e2e, None, "rows/s"),
        row("caption", f"tiny Qwen2.5-VL, {m:,} rows: batched ({args.batch_size}) in-process vs the seed's loop",
            m / batched_s, m / seed_s, "rows/s", ">= 3"),
        row("caption", "the same, `dataset caption` on Ray Data end to end vs the seed's loop", m / ours_s, m / seed_s,
            "rows/s")], about="a tiny random Qwen2.5-VL (the code path, not caption quality); peer: the seed's one "
                 "`generate` call per row.")


if __name__ == "__main__":
    main()
