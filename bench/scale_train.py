"""Training at scale: peak memory and images/s of `emoji-ldm train --workers 2` at 5k, 50k and 500k rows.

Synthetic latent tables of the `tiny` preset's shapes (8x8x4 latents, 16x384
text embeddings: 12.8 KB a row) are written straight to Delta (no images),
with an encode commit and a random tiny VAE beside them, so `train` reads
them as it reads a real latent table. At each size one `emoji-ldm train`
subprocess runs a fixed number of steps while this script samples the
resident memory of its whole process tree (the driver, the raylet, the Ray
Train workers) every 0.2 s (bench/common.py).

The peer is the same command from an earlier commit (`--peer-rev`, default
the last commit with the in-memory data path: the driver materialised the
split and every worker kept all of it), run from a git worktree in the same
session, at the sizes it survives (`--peer-sizes`).

    .venv/bin/python bench/scale_train.py [--sizes 5000,50000,500000] [--steps 40]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import REPO, human, row, run_watched, timed, write_record

sys.path.insert(0, str(REPO))

PEER_REV = "b6f4e2a"  # before the streaming data path (in-memory shards)


def write_table(root: Path, rows: int, vae: str) -> str:
    """A latent table of `rows` synthetic tiny-shaped rows, partitioned by split, with an encode commit."""
    from deltalake import CommitProperties, write_deltalake

    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.store.latents import LATENT_SCHEMA, PARTITION
    from emoji_ldm.store.splits import split_of

    uri = str(root / f"latents-{rows}")
    preset = get_preset("tiny")
    rng = np.random.default_rng(0)
    latent_shape, text_shape = [4, 8, 8], [16, 384]

    def batches():
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            ids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(start, start + n)]
            lat = rng.standard_normal((n, 256), dtype=np.float32).astype(np.float16)
            txt = rng.standard_normal((n, 6144), dtype=np.float32).astype(np.float16)
            yield pa.RecordBatch.from_pydict({
                "id": ids, "caption": [f"synthetic emoji {i}" for i in range(start, start + n)],
                "split": [split_of(i) for i in ids],
                "latent": [r.tobytes() for r in lat], "latent_shape": [latent_shape] * n,
                "text_emb": [r.tobytes() for r in txt], "text_shape": [text_shape] * n,
            }, schema=LATENT_SCHEMA)

    recorded = preset.to_dict()
    recorded["text"].pop("hidden_size")  # as the peer's code recorded it: it compares the text section whole
    meta = {"operation": "encode", "dataset": "synthetic", "dataset_version": 0, "preset": recorded,
            "vae": vae, "text_encoder": "minilm", "counts": {"rows": rows}}
    write_deltalake(uri, pa.RecordBatchReader.from_batches(LATENT_SCHEMA, batches()), partition_by=[PARTITION],
                    commit_properties=CommitProperties(custom_metadata={"emoji_ldm": meta}))
    empty = root / f"latents-{rows}" / "_emoji_ldm"
    empty.mkdir(parents=True, exist_ok=True)
    np.savez(empty / "empty_caption.npz", emb=np.zeros(text_shape, np.float16))
    return uri


def random_vae(root: Path) -> str:
    from emoji_ldm.models.builders import build_vae
    from emoji_ldm.models.presets import get_preset

    vae = build_vae(get_preset("tiny"))
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(root / "vae")
    return str(root / "vae")


def run_train(checkout: Path, data: str, out: str, steps: int, env: dict) -> dict:
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-c", "import sys; from emoji_ldm.cli.main import main; "
           "sys.exit(main(sys.argv[1:]))", "train", "--data", data, "--out", out, "--workers", "2",
           "--max-steps", str(steps), "--set", "train.sample_every=0", "--set", "train.log_every=5",
           "--set", f"train.checkpoint_every={steps}"]
    peaks = {"driver": 0, "worker": 0}  # the root alone, the largest Ray Train worker: resident bytes

    def on_sample(_, procs: list[dict]) -> None:
        for p in procs:
            kind = "driver" if p["root"] else "worker" if "TrainWorker" in p["cmdline"] + p["name"] else None
            if kind:
                peaks[kind] = max(peaks[kind], p["rss"])

    run = run_watched(cmd, on_sample, cwd=checkout, env={**env, "PYTHONPATH": str(checkout)})
    peaks.update(tree=run["peak"])
    if run["rc"] != 0:
        return {"ok": False, "error": "\n".join(line for _, line in run["lines"])[-1500:], "seconds": run["seconds"],
                **peaks}
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steady = [r["images_per_s"] for r in rows[1:]] or [rows[-1]["images_per_s"]]  # the first log has warm-up
    return {"ok": True, "images_per_s": statistics.median(steady), "seconds": run["seconds"], **peaks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,50000,500000")
    parser.add_argument("--peer-sizes", default="5000,50000", help="sizes to run the in-memory peer at")
    parser.add_argument("--peer-rev", default=PEER_REV)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", default=None, help="folder for the tables (default: a temp folder)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    peer_sizes = [int(s) for s in args.peer_sizes.split(",") if s]
    work = Path(args.work or tempfile.mkdtemp(prefix="emoji-ldm-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    peer = work / "peer-checkout"
    if peer_sizes and not peer.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-f", str(peer), args.peer_rev], check=True,
                       capture_output=True)
    vae = random_vae(work)
    results = {}
    try:
        for rows in sizes:
            seconds, data = timed(write_table, work, rows, vae)
            print(f"{rows} rows: table written in {seconds:.0f} s", flush=True)
            for who, checkout in (("ours", REPO), ("peer", peer)):
                if who == "peer" and rows not in peer_sizes:
                    continue
                out = str(work / f"run-{who}-{rows}")
                r = run_train(checkout, data, out, args.steps, env)
                results[(who, rows)] = r
                shutil.rmtree(out, ignore_errors=True)
                if r["ok"]:
                    print(f"  {who}: {r['images_per_s']:.0f} images/s (median after warm-up), peak memory: "
                          f"process tree {r['tree'] / 2**30:.2f} GiB, driver {r['driver'] / 2**30:.2f} GiB, "
                          f"largest worker {r['worker'] / 2**30:.2f} GiB; {r['seconds']:.0f} s", flush=True)
                else:
                    print(f"  {who}: FAILED after {r['seconds']:.0f} s: {r['error'][-400:]}", flush=True)
            shutil.rmtree(data, ignore_errors=True)
    finally:
        if peer.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(peer)], capture_output=True)

    base, summary = results.get(("ours", sizes[0])), []
    print(f"\nratios against ours at {sizes[0]} rows (goals: peak memory <= 1.25x, images/s >= 0.9x):")
    for rows in sizes[1:]:
        r = results.get(("ours", rows))
        if base and base["ok"] and r and r["ok"]:
            print(f"  {rows:>7} rows: tree memory {r['tree'] / base['tree']:.2f}x, driver "
                  f"{r['driver'] / base['driver']:.2f}x, largest worker {r['worker'] / base['worker']:.2f}x, "
                  f"images/s {r['images_per_s'] / base['images_per_s']:.2f}x")
            size = f"{human(rows)} / {human(sizes[0])} rows"
            if rows == sizes[-1]:
                summary += [row("scale_train", f"{k.replace('worker', 'largest worker')} peak RSS, {size}",
                                r[k] / 2**30, base[k] / 2**30, "GiB", "<= 1.25") for k in ("driver", "worker")]
                summary.append(row("scale_train", f"images/s, {size}", r["images_per_s"], base["images_per_s"],
                                   "images/s", ">= 0.9"))
    for rows in peer_sizes:
        ours, theirs = results.get(("ours", rows)), results.get(("peer", rows))
        if ours and theirs and ours["ok"] and theirs["ok"]:
            speed = ours["images_per_s"] / theirs["images_per_s"]
            print(f"  ours vs in-memory peer at {rows} rows: images/s {speed:.2f}x, "
                  f"tree memory {ours['tree'] / theirs['tree']:.2f}x")
            at = f"at {human(rows)} rows: streaming vs the in-memory path"
            summary.append(row("scale_train", f"images/s {at}", ours["images_per_s"], theirs["images_per_s"],
                               "images/s", ">= 0.9"))
            summary += [row("scale_train", f"largest worker peak RSS {at}", ours["worker"] / 2**30,
                            theirs["worker"] / 2**30, "GiB")] if rows == peer_sizes[-1] else []
    write_record("scale_train", {"steps": args.steps, "peer_rev": args.peer_rev, "results": {
        f"{who}:{rows}": r for (who, rows), r in results.items()}}, summary, about="`train --workers 2` on "
        f"synthetic latent tables, peak RSS sampled every 0.2 s; peer: the in-memory data path of `{args.peer_rev}`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
