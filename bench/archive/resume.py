"""Resuming mid-epoch: the time from `emoji-ldm train --resume` to its first step, old code against new.

Old (`--old-rev`, default b2d5b38): a resumed rank rebuilt its stream from the epoch's first row and read,
decoded and shuffled every micro-batch it had already trained on, then dropped them. New (`--new-rev`, default
HEAD): `store/latents.py` `RankStream` replays the shuffle on row numbers alone and reads only the rows still in
the shuffle buffer at the checkpoint, then goes on from the first unread row (files and row groups before it
not opened).

A latent table of `--rows` synthetic rows of the `tiny` preset's shapes (8x8x4 latents, 16x384 text; 90% of
them in the train split), written as `bench/scale_train.py` writes it, and a small UNet (`--set
unet.block_out_channels=32,64`: 0.91M parameters) so that steps are fast. Per side, from a git worktree of that
commit (`PYTHONPATH` set to it, so the driver and its Ray workers import that code):

1. `train --max-steps P` with one checkpoint at P, mid-epoch (global batch 128 on 2 workers: 351 steps per
   epoch at 50k rows; P = 300);
2. `train --resume --max-steps P+1`, from a copy of that output (restored before each repeat): the seconds from
   the command's start to the first step's row in metrics.jsonl (its `time`), and from the arrival of the
   "resumed from" line to that row (the stream's skip, then one step);
3. `train --max-steps 1` into a new output: the same start-to-first-step time without a checkpoint or skip.

Beside the end-to-end runs, the stream alone, in a child process per side (no Ray, no model): the seconds to the
first micro-batch of `RankStream.epoch(0, skip=P)` and of `skip=0`, for each of the 2 ranks, and a digest of
that first batch (the same on both sides: the new code resumes into the same order as the old).

    .venv/bin/python bench/resume.py [--rows 50000] [--steps 300] [--batch-size 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zero3_ema as z  # checkouts, the child process that writes the table, a watched CLI run
from common import REPO, row, timed, write_record

OLD_REV = "b2d5b38"  # the code before the training-harness change (457527b)
SMALL_UNET = ["unet.block_out_channels=32,64", "train.sample_every=0", "train.log_every=50"]

STREAM_PROBE = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[5])  # bench/, for common.timed
from common import timed
from emoji_ldm.store.delta import open_table
from emoji_ldm.store.latents import RankStream, split_files
from emoji_ldm.store.uri import DatasetRef
uri, micro, skip, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = split_files(open_table(DatasetRef(uri)))
out = {"files": len(files), "rows": sum(f.rows for f in files)}

def first(rank, k):
    stream = RankStream(files, rank, 2, micro, seed=0, shuffle_buffer=2048, prefetch=4)
    it = iter(stream.epoch(0, skip=k))
    seconds, batch = timed(next, it)
    it.close()
    out["batches_per_epoch"] = stream.batches_per_epoch
    return seconds, hashlib.md5(batch["latent"].tobytes() + batch["text_emb"].tobytes()).hexdigest()[:12]

first(0, 0)  # warm-up: imports, the filesystem, the page cache
for rank in (0, 1):
    for k in (0, skip):
        runs = [first(rank, k) for _ in range(tries)]
        out[f"rank{rank}_skip{k}"] = {"seconds": min(s for s, _ in runs), "digest": runs[0][1],
                                      "all": [round(s, 3) for s, _ in runs]}
print("PROBE " + json.dumps(out))
"""


def stream_probe(checkout: Path, data: str, micro: int, skip: int, env: dict, tries: int = 3) -> dict:
    """The stream alone in a child process: after a warm-up, the best of `tries` seconds to the first batch."""
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", STREAM_PROBE, data, str(micro), str(skip),
                           str(tries), str(REPO / "bench")],
                          cwd=checkout, env={**env, "PYTHONPATH": str(checkout)}, capture_output=True, text=True,
                          timeout=1200)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    raise RuntimeError(f"stream probe failed in {checkout}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def train_args(data: str, out: str, batch: int, max_steps: int, checkpoint_every: int, resume: bool) -> list[str]:
    args = ["train", "--data", data, "--out", out, "--preset", "tiny", "--workers", "2", "--batch-size", str(batch),
            "--max-steps", str(max_steps), "--set", f"train.checkpoint_every={checkpoint_every}"]
    for o in SMALL_UNET:
        args += ["--set", o]
    return args + (["--resume"] if resume else [])


def first_step(run: dict, out: str, after: int) -> dict:
    """Seconds from the command's start to its first step's row (the first row past step `after`), and from the
    arrival of its "resumed from" line to that row."""
    rows = [r for r in z.metrics_rows(out) if r["step"] > after]
    if run["rc"] != 0 or not rows:
        return {"ok": False, "rc": run["rc"], "tail": run["tail"], "seconds": run["seconds"]}
    at = rows[0]["time"]
    resumed, said = next(((t, line) for t, line in run["lines"] if "resumed from" in line), (None, ""))
    return {"ok": True, "attempts": run["attempts"], "to_first": at - run["start"],
            "resumed_to_first": None if resumed is None else at - resumed, "total": run["seconds"],
            "resumed_line": said.split("[train] ")[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--new-rev", default="HEAD")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=300, help="the checkpoint's step (mid-epoch)")
    parser.add_argument("--batch-size", type=int, default=128, help="global, on 2 workers")
    parser.add_argument("--repeats", type=int, default=2, help="resume and fresh runs per side, interleaved")
    parser.add_argument("--work", default=None, help="folder for the table, runs and worktrees (default: temp)")
    parser.add_argument("--probe-only", action="store_true", help="only the stream alone, no training runs")
    parser.add_argument("--data", default=None, help="an existing synthetic latent table (default: write one)")
    parser.add_argument("--torch-extensions", default=str(z.EXTENSIONS), help="TORCH_EXTENSIONS_DIR of the runs")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="emoji-ldm-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    micro = args.batch_size // 2
    t_start = time.time()
    z.exit_on_sigterm()

    sides, made = {}, []
    for label, rev in (("old", args.old_rev), ("new", args.new_rev)):
        short = z.resolve(rev)
        path = z.add_worktree(work / f"checkout-{short}", short)
        made.append(path)
        sides[f"{label} {short}"] = path
    probes, pretrain, resumes, fresh = {}, {}, {}, {}
    try:
        for name, checkout in sides.items():
            print(f"{name}: emoji_ldm from {z.check_import(checkout, env)}")
        print(f"DeepSpeed's CPU comm op ready in {z.private_extensions(Path(args.torch_extensions), env):.0f} s "
              f"under {args.torch_extensions}")
        write = (f"from pathlib import Path\nfrom scale_train import random_vae, write_table\n"
                 f"work = Path({str(work)!r})\nprint(write_table(work, {args.rows}, random_vae(work)))")
        seconds, data = timed(lambda: args.data or z.in_child(write, env))
        print(f"table: {args.rows} synthetic tiny-shaped rows at {data}, written in {seconds:.0f} s")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)

        for name, checkout in sides.items():  # the stream alone
            p = stream_probe(checkout, data, micro, args.steps, env)
            probes[name] = p
            print(f"  stream, {name}: {p['files']} train files, {p['rows']} rows, {p['batches_per_epoch']} "
                  "micro-batches per rank per epoch; first batch " + ", ".join(
                      f"rank {r} skip {k}: {p[f'rank{r}_skip{k}']['seconds']:.2f} s"
                      for r in (0, 1) for k in (0, args.steps)), flush=True)

        for name, checkout in ([] if args.probe_only else sides.items()):  # 1. train to the checkpoint
            out = str(work / f"run-{name.split()[0]}")
            shutil.rmtree(out, ignore_errors=True)
            a = train_args(data, out, args.batch_size, args.steps, args.steps, resume=False)
            run = z.run_cli(checkout, a, env, before=lambda out=out: shutil.rmtree(out, ignore_errors=True))
            rows = z.metrics_rows(out)
            if run["rc"] != 0 or not rows or rows[-1]["step"] != args.steps:
                print(f"  {name}: training to step {args.steps} FAILED (rc {run['rc']}):\n{run['tail']}")
                return 1
            pristine = Path(out + "-at-checkpoint")
            shutil.rmtree(pristine, ignore_errors=True)
            shutil.copytree(out, pristine)
            pretrain[name] = {"seconds": run["seconds"], "step_time_s": statistics.median(
                r["step_time_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["step_time_s"], "args": a}
            print(f"  {name}: {args.steps} steps in {run['seconds']:.0f} s ({pretrain[name]['step_time_s']:.3f} "
                  f"s/step after the first log; load {os.getloadavg()[0]:.1f})", flush=True)

        for i in range(0 if args.probe_only else args.repeats):  # 2. resume and 3. fresh, interleaved
            for name, checkout in sides.items():
                out = str(work / f"run-{name.split()[0]}")

                def restore(out=out):
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.copytree(out + "-at-checkpoint", out)

                restore()
                a = train_args(data, out, args.batch_size, args.steps + 1, args.steps, resume=True)
                r = first_step(z.run_cli(checkout, a, env, before=restore), out, args.steps)
                r["args"] = a
                resumes.setdefault(name, []).append(r)
                if r["ok"]:
                    print(f"  {name} resume {i + 1}: first step {r['to_first']:.1f} s after the start, "
                          f"{r['resumed_to_first']:.1f} s after '{r['resumed_line']}'; {r['total']:.0f} s in all "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
                else:
                    print(f"  {name} resume {i + 1}: FAILED (rc {r['rc']}):\n{r['tail']}", flush=True)
                fout = str(work / f"fresh-{name.split()[0]}")
                shutil.rmtree(fout, ignore_errors=True)
                a = train_args(data, fout, args.batch_size, 1, 1, resume=False)
                f = first_step(z.run_cli(checkout, a, env, before=lambda o=fout: shutil.rmtree(o, ignore_errors=True)),
                               fout, 0)
                f["args"] = a
                fresh.setdefault(name, []).append(f)
                shutil.rmtree(fout, ignore_errors=True)
                if f["ok"]:
                    print(f"  {name} fresh {i + 1}: first step {f['to_first']:.1f} s after the start; "
                          f"{f['total']:.0f} s in all (load {os.getloadavg()[0]:.1f})", flush=True)
                else:
                    print(f"  {name} fresh {i + 1}: FAILED (rc {f['rc']}):\n{f['tail']}", flush=True)
    finally:
        for path in made:
            z.remove_worktree(path)

    print(f"\nresume at step {args.steps} of {next(iter(probes.values()))['batches_per_epoch']} per epoch, "
          f"{args.rows} rows, global batch {args.batch_size} on 2 workers; medians over {args.repeats} run(s); "
          f"{(time.time() - t_start) / 60:.1f} min in all")
    print(f"| side | stream: first batch, skip {args.steps} (rank 0 / 1) | skip 0 | resume: start -> first step | "
          "'resumed from' -> first step | fresh: start -> first step | resume - fresh |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for name in sides:
        p = probes[name]
        ok_r = [r for r in resumes.get(name, []) if r["ok"]]
        ok_f = [r for r in fresh.get(name, []) if r["ok"]]
        s = {"skip": max(p[f"rank{r}_skip{args.steps}"]["seconds"] for r in (0, 1)),
             "skip0": max(p[f"rank{r}_skip0"]["seconds"] for r in (0, 1))}
        s["resume"] = statistics.median(r["to_first"] for r in ok_r) if ok_r else None
        s["gap"] = statistics.median(r["resumed_to_first"] for r in ok_r) if ok_r else None
        s["fresh"] = statistics.median(r["to_first"] for r in ok_f) if ok_f else None
        summary[name] = s
        extra = (s["resume"] - s["fresh"]) if s["resume"] is not None and s["fresh"] is not None else None
        cells = ["-" if v is None else f"{v:.1f}" for v in (s["resume"], s["gap"], s["fresh"], extra)]
        r0, r1 = p[f"rank0_skip{args.steps}"]["seconds"], p[f"rank1_skip{args.steps}"]["seconds"]
        z0, z1 = p["rank0_skip0"]["seconds"], p["rank1_skip0"]["seconds"]
        print(f"| {name} | {r0:.2f} / {r1:.2f} | {z0:.2f} / {z1:.2f} | " + " | ".join(cells) + " |")
    (old, a), (new, b) = list(summary.items())
    same = all(probes[old][f"rank{r}_skip{args.steps}"]["digest"] == probes[new][f"rank{r}_skip{args.steps}"]["digest"]
               for r in (0, 1))
    print(f"first batch after the skip, old and new: {'the same' if same else 'DIFFERENT'} "
          f"({', '.join(probes[new][f'rank{r}_skip{args.steps}']['digest'] for r in (0, 1))})")
    print(f"new / old: stream's first batch after the skip {b['skip'] / a['skip']:.2f}x "
          f"({a['skip'] / b['skip']:.0f}x faster)")
    if a["resume"] and b["resume"]:
        print(f"new / old: resume start -> first step {b['resume'] / a['resume']:.2f}x; 'resumed from' -> first step "
              f"{b['gap'] / a['gap']:.2f}x")
    rows = [row("resume", f"seconds to the first micro-batch after a {args.steps}-batch skip (slower rank), {new} vs "
                f"{old}", b["skip"], a["skip"], "s")]
    runs = [[r["to_first"] for r in resumes.get(n, []) if r["ok"]] for n in (new, old)]
    if all(runs):
        rows.append(row("resume", f"`train --resume`: seconds to its first step, {new} vs {old}", *runs, "s"))
    write_record("resume", {"rows": args.rows, "steps": args.steps, "batch_size": args.batch_size, "probes": probes,
                            "pretrain": pretrain, "resumes": resumes, "fresh": fresh, "same_first_batch": same}, rows,
                 about="the rank stream alone (no Ray, no model), and `train --resume`; each side a git worktree.")
    for name in resumes:
        print(f"commands ({name}; PYTHONPATH=<checkout>): emoji-ldm {' '.join(pretrain[name]['args'])}  then  "
              f"emoji-ldm {' '.join(resumes[name][0]['args'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
