"""ZeRO-3 and the EMA: peak memory of each Ray Train worker and seconds per step, old code against new.

`emoji-ldm train --zero-stage 3 --workers 2` on CPU with the emoji64 preset's UNet shapes, a few steps,
samples off until the end, one checkpoint at the end. emoji64 itself needs `stabilityai/sd-vae-ft-mse` and
`openai/clip-vit-base-patch32`, which these machines cannot download, so the run is the `tiny` preset (its own
random VAE, MiniLM text) with emoji64's UNet through `--set`: block_out_channels 256,512, 2 layers per block,
8 heads, the same block types, 8x8x4 latents, 77 text tokens. The cross-attention is MiniLM's 384 wide instead
of CLIP's 512: 70.55M parameters instead of 71.01M. The latent table is synthetic rows of those shapes (as
`bench/scale_train.py` writes them).

The two sides, run one after the other in the same session from git worktrees (`PYTHONPATH` set to the
worktree, so the driver and the Ray workers it starts import that code):

- old (`--old-rev`, default b2d5b38, before the training-harness change): under ZeRO-3 every rank gathers
  every parameter at once each step (`GatheredParameters(params)`) and every rank keeps a full EMA;
- new (`--new-rev`, default HEAD): only rank 0 keeps the EMA, fp32, fed from the optimizer's fp32 masters
  (`train/ema.py`); `--working-tree` adds a third side, a copy of this checkout's uncommitted `emoji_ldm/`.

Measured: the peak resident memory of each Ray Train worker (bench/common.py, every 0.2 s, processes whose command
line holds `RayTrainWorker`), up to the last training step's log line and over the whole run (the final
sample grid, checkpoint and export included), and the seconds per step from OUT/metrics.jsonl with
`train.log_every=1`: `step_time_s` as each side's code measures it, and the wall time between consecutive
steps' log rows (the steps after the first; EMA update and logging included on both sides).

    .venv/bin/python bench/zero3_ema.py [--steps 6] [--batch-sizes 128,16] [--also REV] [--repeats 1]
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
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
from common import MiB, row, run_watched, write_record

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


OLD_REV = "b2d5b38"  # the code before the training-harness change (457527b)
EMOJI64_UNET = ["unet.block_out_channels=256,512", "unet.layers_per_block=2", "unet.attention_head_dim=8",
                "unet.down_block_types=CrossAttnDownBlock2D,DownBlock2D",
                "unet.up_block_types=UpBlock2D,CrossAttnUpBlock2D", "text.max_length=77"]


# --- checkouts --------------------------------------------------------------------------


def resolve(rev: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True, capture_output=True,
                          text=True).stdout.strip()


def add_worktree(path: Path, rev: str) -> Path:
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                       capture_output=True)
    return path


def remove_worktree(path: Path) -> None:
    if path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)


def snapshot_working_tree(path: Path) -> tuple[Path, list[str]]:
    """A worktree of HEAD with this checkout's uncommitted emoji_ldm/ files copied over it (a frozen copy: the
    others edit the checkout while the benchmark runs). Returns it and the files that differ from HEAD."""
    add_worktree(path, "HEAD")
    git = ["git", "-C", str(REPO)]
    changed = subprocess.run([*git, "diff", "HEAD", "--name-only", "--", "emoji_ldm"], check=True,
                             capture_output=True, text=True).stdout.split()
    new = subprocess.run([*git, "ls-files", "--others", "--exclude-standard", "--", "emoji_ldm"], check=True,
                         capture_output=True, text=True).stdout.split()
    for name in changed + new:
        src, dst = REPO / name, path / name
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif dst.exists():
            dst.unlink()
    return path, changed + new


def check_import(checkout: Path, env: dict) -> str:
    """Where `import emoji_ldm` resolves with PYTHONPATH=checkout (must be the checkout, not /work/main)."""
    where = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                            "import emoji_ldm; print(emoji_ldm.__file__)"], cwd=checkout, check=True,
                           capture_output=True, text=True, env={**env, "PYTHONPATH": str(checkout)}).stdout.strip()
    if not where.startswith(str(checkout)):
        raise SystemExit(f"PYTHONPATH={checkout}: emoji_ldm imports from {where}, not the checkout")
    return where


# --- the latent table -------------------------------------------------------------------


def write_table(uri: str, rows: int, vae: str, preset, seq: int, width: int, latent=(4, 8, 8)) -> str:
    """`rows` synthetic rows of latents `latent` and text embeddings (seq, width), partitioned by split, with an
    encode commit recording `preset` (scale_train.write_table with the shapes as parameters)."""
    from deltalake import CommitProperties, write_deltalake

    from emoji_ldm.store.latents import LATENT_SCHEMA, PARTITION
    from emoji_ldm.store.splits import split_of

    rng = np.random.default_rng(0)
    n_lat, n_txt = int(np.prod(latent)), seq * width

    def batches():
        for start in range(0, rows, 5_000):
            n = min(5_000, rows - start)
            ids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(start, start + n)]
            lat = rng.standard_normal((n, n_lat), dtype=np.float32).astype(np.float16)
            txt = rng.standard_normal((n, n_txt), dtype=np.float32).astype(np.float16)
            yield pa.RecordBatch.from_pydict({
                "id": ids, "caption": [f"synthetic emoji {i}" for i in range(start, start + n)],
                "split": [split_of(i) for i in ids],
                "latent": [r.tobytes() for r in lat], "latent_shape": [list(latent)] * n,
                "text_emb": [r.tobytes() for r in txt], "text_shape": [[seq, width]] * n,
            }, schema=LATENT_SCHEMA)

    recorded = preset.to_dict()
    meta = {"operation": "encode", "dataset": "synthetic", "dataset_version": 0, "preset": recorded,
            "vae": vae, "text_encoder": "minilm", "counts": {"rows": rows}}
    write_deltalake(uri, pa.RecordBatchReader.from_batches(LATENT_SCHEMA, batches()), partition_by=[PARTITION],
                    commit_properties=CommitProperties(custom_metadata={"emoji_ldm": meta}))
    extra = Path(uri) / "_emoji_ldm"
    extra.mkdir(parents=True, exist_ok=True)
    np.savez(extra / "empty_caption.npz", emb=np.zeros((seq, width), np.float16))
    return uri


def in_child(code: str, env: dict) -> str:
    """Run `code` in a child python (bench/ and the repo on sys.path) and return its last output line: the table
    and the VAE are made there, so this process never imports torch and stays small beside the runs it watches."""
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                           f"import sys; sys.path[:0] = [{str(REPO / 'bench')!r}, {str(REPO)!r}]\n{code}"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def prepare_emoji64_table(work: Path, rows: int, env: dict) -> str:
    return in_child(f"""
from pathlib import Path
from emoji_ldm.models.presets import get_preset
from scale_train import random_vae
from zero3_ema import EMOJI64_UNET, write_table
preset = get_preset("tiny", dict(o.split("=", 1) for o in EMOJI64_UNET))
vae = random_vae(Path({str(work)!r}))
print(write_table({str(work / "latents")!r}, {rows}, vae, preset, seq=preset.text.max_length, width=384))
""", env)


EXTENSIONS = Path.home() / ".cache" / "emoji-ldm-bench" / (
    "torch-extensions-" + hashlib.md5(sys.prefix.encode()).hexdigest()[:8])  # one per virtualenv


def private_extensions(folder: Path, env: dict) -> float:
    """Give the runs a torch-extensions folder of the benchmarks' own (TORCH_EXTENSIONS_DIR, which the Ray workers
    inherit) and build DeepSpeed's CPU comm op there, once, before any measured run (minutes on a busy machine;
    seconds when already built). In the shared ~/.cache/torch_extensions, checkouts with other virtualenvs rebuild
    it in turn, and a worker killed while it holds the build lock (Ray's memory monitor does) leaves a lock file
    that every later DeepSpeed start waits on forever. Returns the seconds it took."""
    env["TORCH_EXTENSIONS_DIR"] = str(folder)
    t0 = time.time()
    in_child("import os\nos.environ['DS_ACCELERATOR'] = 'cpu'\nfrom deepspeed.accelerator import get_accelerator\n"
             "get_accelerator().create_op_builder('ShareMemCommBuilder').load()\nprint('built')", env)
    return time.time() - t0


def exit_on_sigterm() -> None:
    """SIGTERM ends the benchmark through its `finally` (the worktrees are removed)."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def wait_for_memory(need_gib: float, max_wait: float = 600) -> float:
    """Wait (up to `max_wait` s) until the machine has `need_gib` GiB available: the others' tests share its
    24 GiB, and Ray's memory monitor kills workers when the whole node passes 95%. Returns the seconds waited."""
    t0 = time.time()
    while psutil.virtual_memory().available < need_gib * 2**30 and time.time() - t0 < max_wait:
        time.sleep(5)
    return time.time() - t0


# --- one CLI run, watched ---------------------------------------------------------------


def run_cli(checkout: Path, args: list[str], env: dict, timeout: float = 1800, need_gib: float = 4.0,
            retries: int = 2, before=None) -> dict:
    """`emoji-ldm ARGS` from `checkout` (PYTHONPATH=checkout), watched (`watch_cli`). A run whose workers Ray's
    memory monitor killed (the node, shared with the others' tests, passed 95%) is run again, up to `retries`
    times, after `before()` (restores what the run changed) and a wait for `need_gib` GiB available; the
    result's `attempts` counts them."""
    for attempt in range(1, retries + 2):
        waited = wait_for_memory(need_gib)
        run = watch_cli(checkout, args, env, timeout)
        run.update(attempts=attempt, waited=waited)
        if run["rc"] == 0 or "Ray killed" not in "\n".join(line for _, line in run["lines"]) or attempt > retries:
            return run
        print(f"    (attempt {attempt}: Ray's memory monitor killed workers, load {os.getloadavg()[0]:.0f}, "
              f"{psutil.virtual_memory().available / 2**30:.1f} GiB available now; again)", flush=True)
        if before is not None:
            before()
    return run


def watch_cli(checkout: Path, args: list[str], env: dict, timeout: float = 1800) -> dict:
    """`emoji-ldm ARGS` from `checkout` (PYTHONPATH=checkout). While it runs: each output line with its arrival
    time, and every 0.2 s the resident memory of its process tree and of each Ray Train worker in it."""
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-c",
           "import sys; from emoji_ldm.cli.main import main; sys.exit(main(sys.argv[1:]))", *args]
    workers: dict[int, list[tuple[float, int]]] = {}  # pid -> [(epoch seconds, rss)]

    def on_sample(now: float, procs: list[dict]) -> None:
        for p in procs:
            if "RayTrainWorker" in p["cmdline"]:
                workers.setdefault(p["pid"], []).append((now, p["rss"]))

    run = run_watched(cmd, on_sample, timeout=timeout, cwd=checkout, env={**env, "PYTHONPATH": str(checkout)})
    return {**run, "workers": workers, "tree_peak": run["peak"],
            "tail": "\n".join(line for _, line in run["lines"][-40:])}


def metrics_rows(out: str) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def worker_peaks(run: dict, until: float | None = None) -> list[int]:
    """Each Ray Train worker's peak RSS (samples up to `until` if given), largest first; a process sampled fewer
    than 5 times (a worker of an earlier attempt that died at once) is left out."""
    peaks = []
    for series in run["workers"].values():
        kept = [rss for t, rss in series if until is None or t <= until]
        if len(series) >= 5 and kept:
            peaks.append(max(kept))
    return sorted(peaks, reverse=True)


# --- the benchmark ----------------------------------------------------------------------


def one_run(name: str, checkout: Path, data: str, work: Path, steps: int, batch: int, env: dict) -> dict:
    out = str(work / f"run-{name}")
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", "--data", data, "--out", out, "--preset", "tiny", "--workers", "2", "--zero-stage", "3",
            "--batch-size", str(batch), "--max-steps", str(steps), "--set", "train.sample_every=0",
            "--set", "train.log_every=1", "--set", f"train.checkpoint_every={steps}"]
    for o in EMOJI64_UNET:
        args += ["--set", o]
    run = run_cli(checkout, args, env, need_gib=1.5 + 2 * (2.9 + batch / 70),
                  before=lambda: shutil.rmtree(out, ignore_errors=True))
    rows = metrics_rows(out)
    shutil.rmtree(out, ignore_errors=True)
    if run["rc"] != 0 or len(rows) < steps:
        return {"ok": False, "rc": run["rc"], "tail": run["tail"], "seconds": run["seconds"],
                "attempts": run["attempts"]}
    first_began = rows[0]["time"] - rows[0]["step_time_s"]  # about when step 1 began
    walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    return {"ok": True, "seconds": run["seconds"], "tree_peak": run["tree_peak"],
            "setup_peaks": worker_peaks(run, until=first_began),
            "train_peaks": worker_peaks(run, until=rows[-1]["time"]), "run_peaks": worker_peaks(run),
            "step_time_s": statistics.median(r["step_time_s"] for r in rows[1:]),
            "wall_s": statistics.median(walls), "command": "emoji-ldm " + " ".join(args),
            "attempts": run["attempts"], "waited": run["waited"]}


def fmt_peaks(peaks: list[int]) -> str:
    return " / ".join(f"{p / MiB:.0f}" for p in peaks) if peaks else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--new-rev", default="HEAD")
    parser.add_argument("--also", action="append", default=[], metavar="REV",
                        help="another commit to run between old and new (repeatable)")
    parser.add_argument("--working-tree", action="store_true",
                        help="also run a frozen copy of this checkout's uncommitted emoji_ldm/")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-sizes", default="128,16", help="global batches to run at (emoji64's: 128)")
    parser.add_argument("--rows", type=int, default=4096, help="synthetic latent rows")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side and batch size, interleaved")
    parser.add_argument("--work", default=None, help="folder for the table, runs and worktrees (default: temp)")
    parser.add_argument("--torch-extensions", default=str(EXTENSIONS), help="TORCH_EXTENSIONS_DIR of the runs")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="emoji-ldm-zero3-ema-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    t_start = time.time()
    exit_on_sigterm()

    sides, made = {}, []
    for label, rev in [("old", args.old_rev), *(("mid", r) for r in args.also), ("new", args.new_rev)]:
        short = resolve(rev)
        path = add_worktree(work / f"checkout-{short}", short)
        made.append(path)
        sides[f"{label} {short}"] = path
    if args.working_tree:
        path, changed = snapshot_working_tree(work / "checkout-working-tree")
        made.append(path)
        if changed:
            sides[f"working tree ({len(changed)} files over HEAD)"] = path
            print(f"working tree: {', '.join(changed)} differ from HEAD")
        else:
            print("working tree: emoji_ldm/ is HEAD's, not run separately")
    results: dict[tuple[int, str], list[dict]] = {}
    try:
        for name, checkout in sides.items():
            print(f"{name}: emoji_ldm from {check_import(checkout, env)}")
        print(f"DeepSpeed's CPU comm op ready in {private_extensions(Path(args.torch_extensions), env):.0f} s "
              f"under {args.torch_extensions}")
        data = prepare_emoji64_table(work, args.rows, env)
        print(f"table: {args.rows} synthetic rows (8x8x4 latents, 77x384 text) at {data}")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
        for batch in batches:
            for i in range(args.repeats):
                for name, checkout in sides.items():
                    r = one_run(f"{name.split()[0]}-{batch}-{i}", checkout, data, work, args.steps, batch, env)
                    results.setdefault((batch, name), []).append(r)
                    if r["ok"]:
                        print(f"  batch {batch}, {name}, run {i + 1}: workers' peak RSS before step 1 "
                              f"{fmt_peaks(r['setup_peaks'])} MiB, during the steps {fmt_peaks(r['train_peaks'])}"
                              f" MiB, whole run {fmt_peaks(r['run_peaks'])} MiB; step_time_s "
                              f"{r['step_time_s']:.2f}, wall {r['wall_s']:.2f} s/step; {r['seconds']:.0f} s in all "
                              f"(load {os.getloadavg()[0]:.1f}; attempt {r['attempts']}, waited "
                              f"{r['waited']:.0f} s for memory)", flush=True)
                    else:
                        print(f"  batch {batch}, {name}, run {i + 1}: FAILED (rc {r['rc']}) after "
                              f"{r['seconds']:.0f} s:\n{r['tail']}", flush=True)
    finally:
        for path in made:
            remove_worktree(path)

    print(f"\nZeRO-3, 2 CPU workers, emoji64 UNet shapes (70.55M params), {args.steps} steps; medians over "
          f"{args.repeats} run(s) per side; peak RSS of the two Ray Train workers, larger / smaller, MiB; "
          f"{(time.time() - t_start) / 60:.1f} min in all")
    print("| batch | side | before step 1 | during the steps | whole run | step_time_s | wall s/step |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for (batch, name), runs in results.items():
        ok = [r for r in runs if r["ok"]]
        if not ok:
            print(f"| {batch} | {name} | failed | | | | |")
            continue
        s = {k: statistics.median(r[k] for r in ok) for k in ("step_time_s", "wall_s")}
        for k in ("setup_peaks", "train_peaks", "run_peaks"):
            s[k] = [int(statistics.median(p)) for p in zip(*(r[k] for r in ok))]
        summary[(batch, name)] = s
        print(f"| {batch} | {name} | {fmt_peaks(s['setup_peaks'])} | {fmt_peaks(s['train_peaks'])} | "
              f"{fmt_peaks(s['run_peaks'])} | {s['step_time_s']:.2f} | {s['wall_s']:.2f} |")
    names, rows = list(sides), []
    for batch in batches:
        base = summary.get((batch, names[0]))
        for name in names[1:]:
            b = summary.get((batch, name))
            if not base or not b:
                continue
            print(f"batch {batch}, {name} / {names[0]}: peak during the steps, larger worker "
                  f"{b['train_peaks'][0] / base['train_peaks'][0]:.2f}x, smaller "
                  f"{b['train_peaks'][-1] / base['train_peaks'][-1]:.2f}x, both "
                  f"{sum(b['train_peaks']) / sum(base['train_peaks']):.2f}x; whole run, both "
                  f"{sum(b['run_peaks']) / sum(base['run_peaks']):.2f}x; "
                  f"wall s/step {b['wall_s'] / base['wall_s']:.2f}x "
                  f"(step_time_s {b['step_time_s'] / base['step_time_s']:.2f}x: not the same span on both sides)")
            new, old = ([r for r in results[(batch, n)] if r["ok"]] for n in (name, names[0]))
            for i, which in ((0, "larger"), (-1, "smaller")):
                peaks = [[r["train_peaks"][i] / MiB for r in runs] for runs in (new, old)]
                rows.append(row("zero3_ema", f"batch {batch}: peak RSS during the steps, {which} worker, {name} vs "
                                f"{names[0]}", *peaks, "MiB"))
            rows.append(row("zero3_ema", f"batch {batch}: wall seconds per step, {name} vs {names[0]}",
                            [r["wall_s"] for r in new], [r["wall_s"] for r in old], "s"))
    write_record("zero3_ema", {"steps": args.steps, "rows": args.rows, "repeats": args.repeats, "load_at_end":
                               os.getloadavg()[0], "runs": {f"{b} {n}": runs for (b, n), runs in results.items()}},
                 rows, about="`train --zero-stage 3 --workers 2` with emoji64's UNet shapes: each side from a git "
                 "worktree (PYTHONPATH), peak RSS of each Ray Train worker sampled every 0.2 s.")
    for runs in results.values():
        for r in runs:
            if r["ok"]:
                print("command (from each checkout, PYTHONPATH=<checkout>):", r["command"])
                return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
