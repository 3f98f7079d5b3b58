"""Stages at scale: per-process peak memory and rows/s of build, caption, encode, train and bulk at N and 10N rows.

Each stage runs as its own `emoji-ldm` CLI process (the driver), which
starts a fresh local Ray (RAY_ADDRESS is removed from its environment, and
RAY_TMPDIR is a folder of this run's, so that it cannot join a `ray start`
cluster on the machine; a `ray stop` elsewhere still kills it). While
it runs, this script samples the resident memory of its whole process tree
every 0.2 s (bench/common.py): the driver alone, the raylet, the GCS, each Ray
worker by its title (a `ray::...` process: a task, a Ray Data actor; not the
dashboard agents; the largest is reported) and the whole tree.

  build    `dataset build --source synthetic:N --out DS`               N rows
  caption  `dataset caption DS --captioner metadata`                    N rows; Delta versions one pass made
  encode   `encode --dataset DS --preset tiny --out LAT --vae VAE`      N rows
  train    `train --data LAT --preset tiny --workers 2 --max-steps S`  N latent rows (encode's table); rate:
                                                                        the median images/s of the logged steps
                                                                        after the first (a fixed number of steps:
                                                                        the rows change what is read, not how much)
  bulk     `bulk --model RUN --prompts P.txt --per-prompt 1 --steps 2`  P prompts (distinct), 1 image each

Not measured (set-up): `train-vae` on the smallest dataset (few steps) for
encode's `--vae`, and `train` of the tiny UNet on the smallest latent table
(few steps) for bulk's `--model`.

rows/s is given twice: the stage's own time (the figure the CLI prints: after
Ray has started) and the CLI process's wall time (Ray start included).
Ratios are the largest size against the smallest (issue 28's goals: no
process, driver, raylet, GCS or largest worker, grows more than 1.25x in
private memory (RSS - shared, what Ray's memory monitor counts), rows/s at
least 0.9x; one caption pass = 1 new version). Build de-duplicates on the
driver up to LOCAL_DEDUPE_KEYS (200,000) keys and in Ray above: sizes on both
sides of it run two code paths, and the record's build rows say so.

    .venv/bin/python bench/scale_data.py [--sizes 10000,100000] [--prompts 1000,10000]
        [--encode-sizes 10000,100000] [--stages build,caption,encode,train,bulk] [--train-scale-steps 40]
        [--json COPY.json]   # the record (bench/results/scale_data-<date>.json, rewritten after every stage)
        [--work DIR]   # kept; a later run with the same --work reuses its datasets, VAE and model for the
                       # stages it does not list (e.g. --stages encode re-measures encode alone)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, human, row, run_timed, run_watched, write_record

CLI = str(REPO / ".venv" / "bin" / "emoji-ldm")
# issue 28: no process (driver, raylet, GCS, largest worker) grows more than 1.25x, rows/s at least 0.9x
GOAL_MEMORY, GOAL_SPEED = 1.25, 0.9
PROCESSES = ("driver", "raylet", "gcs", "worker")
LABELS = {"gcs": "GCS", "worker": "largest worker"}
WHAT = {"build": ("rows", "rows/s"), "caption": ("rows", "rows/s"), "encode": ("rows", "rows/s"),
        "train": ("latent rows", "images/s"), "bulk": ("prompts", "images/s")}  # the sizes, the rate
# Ray's own service processes: not workers
NOT_WORKERS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
# the stage's own seconds, from the summary line the CLI prints
STAGE_SECONDS = {
    "build": re.compile(r"^build: .*\| ([\d.]+) s", re.M),
    "caption": re.compile(r"^caption: .* in ([\d.]+) s", re.M),
    "encode": re.compile(r"^encode: .*\| ([\d.]+) s", re.M),
    "bulk": re.compile(r"^bulk: .* in ([\d.]+) s", re.M),
}


def run_stage(stage: str, rows: int, args: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """One CLI process, its tree sampled every 0.2 s. Peaks: `driver`, `raylet`, `gcs`, `worker` (the largest
    Ray worker: a `ray::...` process, a task or a Ray Data actor) in RSS, and the same with `_private` in private
    memory (RSS less shared pages: libraries, and the object store's pages it mapped, which live once per node)."""
    peaks = {"worker_title": "", "worker_private_title": "", "workers": {},
             **{f"{proc}{kind}": 0 for proc in PROCESSES for kind in ("", "_private")}}
    seen: dict[int, dict] = {}  # worker pid -> its peaks and the tasks it ran

    def on_sample(_, procs: list[dict]) -> None:
        for p in procs:
            role = "driver" if p["root"] else next((d for d in ("raylet", "gcs_server") if p["name"] == d or
                                                    p["title"].endswith("/" + d)), None)
            if role:
                for kind, value in (("", p["rss"]), ("_private", p["private"])):
                    key = role.removesuffix("_server") + kind
                    peaks[key] = max(peaks[key], value)
            elif p["title"].startswith("ray::") and not p["title"].startswith(NOT_WORKERS):
                # a worker runs many tasks: its peak, and what it ran (an idle worker keeps its memory)
                title, peak = p["title"].split(" ")[0][:60], seen.setdefault(p["pid"], {"rss": 0, "private": 0,
                                                                                        "titles": set()})
                peak["rss"], peak["private"] = max(peak["rss"], p["rss"]), max(peak["private"], p["private"])
                if title != "ray::IDLE":
                    peak["titles"].add(title)
                for kind, value in (("", peak["rss"]), ("_private", peak["private"])):
                    if value > peaks["worker" + kind]:
                        peaks["worker" + kind] = value
                        peaks[f"worker{kind}_title"] = ", ".join(sorted(peak["titles"])) or title

    run = run_watched([CLI, *args], on_sample, log=log, cwd=cwd, env=env)
    peaks.update(tree=run["peak"], processes=run["processes"])
    # the private peak of the largest worker that ran each kind of task: {"ray::MapBatches(ingest_batch)": bytes}
    for peak in seen.values():
        for title in peak["titles"]:
            peaks["workers"][title] = max(peaks["workers"].get(title, 0), peak["private"])
    result = {"ok": run["rc"] == 0, "command": "emoji-ldm " + " ".join(args), "wall_s": run["seconds"], **peaks}
    if not peaks["worker"]:
        print(f"  WARNING: no Ray worker under the {stage} driver (it joined another Ray instance?)", flush=True)
    text = log.read_text(errors="replace")
    if not result["ok"]:
        result["error"] = text[-3000:]
        return result
    m = STAGE_SECONDS[stage].search(text) if stage in STAGE_SECONDS else None
    result["stage_s"] = float(m.group(1)) if m else None
    if stage == "train":  # images/s of the steps (metrics.jsonl in --out), the first log after warm-up
        steps = [json.loads(line) for line in (Path(args[args.index("--out") + 1]) / "metrics.jsonl").read_text()
                 .splitlines()]
        result["rate"] = statistics.median([r["images_per_s"] for r in steps[1:]] or [steps[-1]["images_per_s"]])
    elif result["stage_s"]:
        result["rate"] = rows / result["stage_s"]
    summary = [line for line in text.splitlines() if line.startswith(f"{stage}:")]
    result["summary"] = summary[-1] if summary else ""
    return result


def setup(args: list[str], cwd: Path, env: dict, log: Path) -> None:
    with open(log, "w") as out:
        seconds, r = run_timed([CLI, *args], check=False, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    print(f"  set-up `emoji-ldm {' '.join(args)}`: rc {r.returncode}, {seconds:.0f} s", flush=True)
    if r.returncode != 0:
        raise SystemExit(f"set-up failed, see {log}:\n{log.read_text(errors='replace')[-2000:]}")


def delta_version(uri: Path) -> int:
    from deltalake import DeltaTable

    return DeltaTable(str(uri)).version()


def write_prompts(path: Path, n: int) -> None:
    adjectives = ["smiling", "crying", "winking", "sleepy", "angry", "laughing", "shy", "cool", "surprised", "sad"]
    things = ["cat", "dog", "robot", "sun", "ghost", "frog", "heart", "star", "pizza", "cactus"]
    lines = [f"{adjectives[i % 10]} {things[(i // 10) % 10]} face number {i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def path_note(stage: str, lo: int, hi: int) -> str | None:
    """Where the two sizes run different code: build de-duplicates on the driver up to LOCAL_DEDUPE_KEYS."""
    from emoji_ldm.ingest.build import LOCAL_DEDUPE_KEYS

    if stage == "build" and lo <= LOCAL_DEDUPE_KEYS < hi:
        return (f"path changes between sizes: not a scaling result (up to {LOCAL_DEDUPE_KEYS:,} keys build "
                "de-duplicates on the driver, above it in Ray; compare sizes on one side); the goals do not apply")
    return None


def report(results: dict, sizes: dict) -> tuple[dict, list[dict]]:
    """Print the table and the largest/smallest ratios; return the ratios and the record's summary rows."""
    print("\nmemory in GiB, private (RSS less shared pages) / RSS")
    print("stage    rows      stage s   rows/s(stage)  wall s  rows/s(wall)  driver     raylet     GCS        "
          "worker     tree  versions  largest worker (private)")
    for key, r in results.items():
        stage, rows = key.split(":")
        rows = int(rows)
        if not r["ok"]:
            print(f"{stage:8} {rows:>7}  FAILED: {r['error'].strip().splitlines()[-1][:150]}")
            continue
        rs = r.get("rate") or float("nan")
        mem = "  ".join(f"{gib(r[p + '_private'])}/{gib(r[p])}" for p in PROCESSES)
        print(f"{stage:8} {rows:>7}  {r.get('stage_s') or float('nan'):>7.1f}  {rs:>13.1f}  {r['wall_s']:>6.1f}  "
              f"{rows / r['wall_s']:>12.1f}  {mem}  {gib(r['tree'])}  {str(r.get('new_versions', '')):>8}  "
              f"{r['worker_private_title'][:50]}")
    ratios, rows = {}, []
    print(f"\nratios, largest size against smallest (goals: every process's private memory <= {GOAL_MEMORY}x, "
          f"rows/s >= {GOAL_SPEED}x, one caption pass = 1 version):")
    for stage, ns in sizes.items():
        if len(ns) < 2:
            continue
        lo, hi = results.get(f"{stage}:{min(ns)}"), results.get(f"{stage}:{max(ns)}")
        if not (lo and hi and lo["ok"] and hi["ok"]):
            print(f"  {stage}: not both sizes ran")
            continue
        ra = {"sizes": [min(ns), max(ns)]}
        for proc in PROCESSES + tuple(p + "_private" for p in PROCESSES) + ("tree",):
            ra[proc] = hi[proc] / lo[proc] if lo[proc] else None
        # the same worker title at both sizes: which kind of worker grows
        ra["workers"] = {t: hi["workers"][t] / lo["workers"][t] for t in hi["workers"] if lo["workers"].get(t)}
        ra["rows_per_s_wall"] = (max(ns) / hi["wall_s"]) / (min(ns) / lo["wall_s"])
        ra["rows_per_s_stage"] = hi["rate"] / lo["rate"] if hi.get("rate") and lo.get("rate") else None
        ratios[stage] = ra
        note, size = path_note(stage, min(ns), max(ns)), f"{human(max(ns))} / {human(min(ns))} {WHAT[stage][0]}"
        for p in PROCESSES:
            rows.append(row(f"scale_data: {stage}", f"{LABELS.get(p, p)}, private memory, {size}",
                            hi[p + "_private"] / 2**20, lo[p + "_private"] / 2**20, "MiB",
                            None if note else f"<= {GOAL_MEMORY}", note))
        rows.append(row(f"scale_data: {stage}", f"rate, {size}", hi.get("rate"), lo.get("rate"), WHAT[stage][1],
                        None if note else f">= {GOAL_SPEED}", note))
        speed = ra["rows_per_s_stage"] if ra["rows_per_s_stage"] is not None else ra["rows_per_s_wall"]
        met = all((ra[p + "_private"] or 0) <= GOAL_MEMORY for p in PROCESSES) and speed >= GOAL_SPEED

        def x(v):
            return f"{v:.2f}x" if v is not None else "n/a"

        growth = ", ".join(f"{p} {x(ra[p + '_private'])} ({x(ra[p])} RSS)" for p in PROCESSES)
        print(f"  {stage:8} {max(ns)}/{min(ns)}: private memory {growth}, tree {x(ra['tree'])}; rows/s "
              f"{x(ra['rows_per_s_stage'])} (stage) {ra['rows_per_s_wall']:.2f}x (wall) -> "
              f"{'n/a: the path changes' if note else 'met' if met else 'NOT met'}")
        grown = sorted(ra["workers"].items(), key=lambda kv: -kv[1])[:3]
        print("           private memory of the workers that ran each task, largest growth: " + ", ".join(
            f"{t} {hi['workers'][t] / 2**30:.2f} GiB ({v:.2f}x)" for t, v in grown))
        if note:
            print(f"           {note}")
    for key, r in results.items():
        if key.startswith("caption:") and r["ok"]:
            print(f"  caption at {key.split(':')[1]} rows: {r['new_versions']} new version(s) in one pass "
                  f"({'met' if r['new_versions'] == 1 else 'NOT met'})")
    return ratios, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="synthetic rows for build and caption")
    parser.add_argument("--encode-sizes", default=None, help="rows for encode (default: --sizes); each must be "
                        "in --sizes")
    parser.add_argument("--prompts", default="1000,10000", help="distinct prompts for bulk")
    parser.add_argument("--stages", default="build,caption,encode,train,bulk")
    parser.add_argument("--vae-steps", type=int, default=20, help="set-up: train-vae steps")
    parser.add_argument("--train-steps", type=int, default=20, help="set-up: UNet train steps (bulk's model)")
    parser.add_argument("--train-scale-steps", type=int, default=40, help="the train stage's steps at each size")
    parser.add_argument("--work", default=None, help="folder for the datasets (default: a temp folder, removed)")
    parser.add_argument("--json", default=None, help="also copy the record here")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    encode_sizes = sorted(int(s) for s in (args.encode_sizes or args.sizes).split(","))
    prompts = sorted(int(s) for s in args.prompts.split(","))
    stages = args.stages.split(",")
    if not set(encode_sizes) <= set(sizes):
        parser.error("--encode-sizes must be a subset of --sizes")
    work = Path(args.work or tempfile.mkdtemp(prefix="emoji-ldm-scale-data-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's temp folder of our own: without an address ray.init() joins the cluster of the machine's last
    # `ray start` (<RAY_TMPDIR>/ray/ray_current_cluster), e.g. a test's; each stage must start its own
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rsd-", dir="/tmp")
    def library() -> tuple[str, str]:  # the commit, and what differs under emoji_ldm/ (the editable install)
        return tuple(subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
                     for a in (["rev-parse", "--short", "HEAD"], ["diff", "--stat", "HEAD", "--", "emoji_ldm"]))

    commit, dirty = library()
    print(f"commit {commit}{' (+ uncommitted changes under emoji_ldm/)' if dirty else ''}; work folder {work}",
          flush=True)

    results: dict[str, dict] = {}

    def save(final: bool) -> None:
        """Write the record: after every stage (a run stopped by SIGTERM or a lost session keeps what it measured),
        and at the end with the ratios, the summary rows and the report."""
        grid = {"build": sizes, "caption": sizes, "encode": encode_sizes, "train": encode_sizes, "bulk": prompts}
        grid = {s: ns for s, ns in grid.items() if s in stages}
        ratios, rows = report(results, grid) if final else ({}, [])
        end_commit, end_dirty = library()
        if final and (end_commit, end_dirty) != (commit, dirty):
            print(f"\nNOTE: the library changed during the run: commit {commit} -> {end_commit}, uncommitted "
                  f"changes under emoji_ldm/ at the end:\n{end_dirty or '(none)'}")
        path = write_record("scale_data", {
            "complete": final, "library_uncommitted": dirty, "end_commit": end_commit,
            "end_library_uncommitted": end_dirty, "results": results, "ratios": ratios,
            "goals": {"process_memory_ratio_max": GOAL_MEMORY, "rows_per_s_ratio_min": GOAL_SPEED,
                      "caption_versions_per_pass": 1}}, rows, about="each stage one CLI process on its own local "
            "Ray, its tree sampled every 0.2 s (private memory: RSS less shared); the large size against the small.")
        if args.json:
            shutil.copy(path, args.json)

    def measure(stage: str, rows: int, cli: list[str]) -> dict:
        r = run_stage(stage, rows, cli, work, env, logs / f"{stage}-{rows}.log")
        results[f"{stage}:{rows}"] = r
        if r["ok"]:
            print(f"  {stage} {rows}: {r['wall_s']:.0f} s wall, stage {r.get('stage_s')} s; peak private/RSS GiB: "
                  f"driver {gib(r['driver_private'])}/{gib(r['driver'])}, raylet {gib(r['raylet_private'])}/"
                  f"{gib(r['raylet'])}, GCS {gib(r['gcs_private'])}/{gib(r['gcs'])}, largest worker "
                  f"{gib(r['worker_private'])}/{gib(r['worker'])} ({r['worker_private_title'][:60]}), "
                  f"tree {gib(r['tree'])} | {r['summary']}", flush=True)
        else:
            print(f"  {stage} {rows}: FAILED after {r['wall_s']:.0f} s (log {logs / f'{stage}-{rows}.log'}):\n"
                  f"    {r['command']}\n{r['error'][-1200:]}", flush=True)
        save(final=False)
        return r

    ds = {n: work / f"ds-{n}" for n in sizes}
    try:
        for n in sizes:
            if "build" in stages or not (ds[n] / "_delta_log").exists():
                shutil.rmtree(ds[n], ignore_errors=True)
                measure("build", n, ["dataset", "build", "--source", f"synthetic:{n}", "--out", str(ds[n])])
            if "caption" in stages:
                before = delta_version(ds[n])
                r = measure("caption", n, ["dataset", "caption", str(ds[n]), "--captioner", "metadata"])
                if r["ok"]:
                    r["new_versions"] = delta_version(ds[n]) - before
                    print(f"    caption pass made {r['new_versions']} new Delta version(s)", flush=True)
        lat = {n: work / f"latents-{n}" for n in encode_sizes}
        if {"encode", "train", "bulk"} & set(stages):
            vae = work / "vae"
            if not (vae / "config.json").exists():
                setup(["train-vae", "--dataset", str(ds[sizes[0]]), "--out", str(vae), "--workers", "1",
                       "--max-steps", str(args.vae_steps)], work, env, logs / "train-vae.log")
            for n in encode_sizes:
                if "encode" in stages or not (lat[n] / "_delta_log").exists():
                    if not {"encode", "train"} & set(stages) and n != encode_sizes[0]:
                        continue
                    shutil.rmtree(lat[n], ignore_errors=True)
                    measure("encode", n, ["encode", "--dataset", str(ds[n]), "--preset", "tiny", "--out", str(lat[n]),
                                          "--vae", str(vae)])
        if "train" in stages:
            for n in encode_sizes:
                out = work / f"train-{n}"
                shutil.rmtree(out, ignore_errors=True)
                measure("train", n, ["train", "--data", str(lat[n]), "--preset", "tiny", "--out", str(out),
                                     "--workers", "2", "--max-steps", str(args.train_scale_steps),
                                     "--set", "train.sample_every=0", "--set", "train.log_every=5",
                                     "--set", f"train.checkpoint_every={args.train_scale_steps}"])
        if "bulk" in stages:
            run = work / "run"
            if not (run / "model").exists():
                setup(["train", "--data", str(lat[encode_sizes[0]]), "--preset", "tiny", "--out", str(run),
                       "--workers", "1", "--max-steps", str(args.train_steps), "--set", "train.sample_every=0",
                       "--set", f"train.checkpoint_every={args.train_steps}"], work, env, logs / "train.log")
            for p in prompts:
                pfile = work / f"prompts-{p}.txt"
                write_prompts(pfile, p)
                out = work / f"bulk-{p}"
                shutil.rmtree(out, ignore_errors=True)
                measure("bulk", p, ["bulk", "--model", str(run), "--prompts", str(pfile), "--out", str(out),
                                    "--per-prompt", "1", "--steps", "2"])
    finally:
        save(final=True)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
