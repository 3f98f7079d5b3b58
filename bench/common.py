"""What every benchmark in bench/ shares: process memory, timing and repeats, medians and spreads, the record.

Each script ends with `write_record(bench, figures, summary)`: one JSON file per run,
bench/results/<bench>-<UTC date-time of the run's start>.json, with the command as run, the commit, the date,
the machine, every raw figure (every repeat) and the summary rows (`row`) that bench/render.py turns into
bench/RESULTS.md. A run that saves as it goes calls it again: the same file is rewritten.
BENCH_RESULTS_DIR writes the records elsewhere (a trial run that should not replace the published ones).

Memory is given in RSS and in private memory, RSS less shared pages: what Ray's own memory monitor charges a
process with (ray/_private/memory_monitor.py, `get_rss`). The shared pages are libraries and the object
store's pages a process has mapped, counted once per node.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR") or REPO / "bench" / "results")
START = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)  # the run's start: its record's name and date
MiB, GiB = 2**20, 2**30


# --- process memory ---------------------------------------------------------------------------------------


def private_mib(proc=None) -> float:
    """A process's private memory in MiB (RSS less shared pages); this process by default."""
    import psutil

    m = (proc or psutil.Process()).memory_info()
    return (m.rss - m.shared) / MiB


def sample_tree(root) -> list[dict]:
    """Every live process of `root`'s tree now, root first: pid, root (bool), name, title (argv[0], e.g.
    `ray::MapBatches(f)`), cmdline, rss and private bytes. Raises psutil.NoSuchProcess once `root` is gone."""
    import psutil

    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            mem, cmd = p.memory_info(), p.cmdline()
            out.append({"pid": p.pid, "root": p.pid == root.pid, "name": p.name(), "title": cmd[0] if cmd else
                        p.name(), "cmdline": " ".join(cmd), "rss": mem.rss, "private": mem.rss - mem.shared})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


class TreeSampler:
    """`with TreeSampler(pid, on_sample):` samples the process tree of `pid` every `interval` s on a thread,
    passing each sample to `on_sample(epoch seconds, sample_tree(...))`. Keeps the tree's peak RSS (`peak`) and
    the most processes under the root (`processes`)."""

    def __init__(self, pid: int, on_sample=None, interval: float = 0.2):
        self.pid, self.on_sample, self.interval = pid, on_sample, interval
        self.peak = self.processes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            while not self._done.is_set():
                now, procs = time.time(), sample_tree(root)
                self.peak = max(self.peak, sum(p["rss"] for p in procs))
                self.processes = max(self.processes, len(procs) - 1)
                if self.on_sample:
                    self.on_sample(now, procs)
                self._done.wait(self.interval)
        except psutil.NoSuchProcess:
            return

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(5)


def run_watched(cmd: list[str], on_sample=None, log: Path | None = None, timeout: float | None = None,
                interval: float = 0.2, **popen) -> dict:
    """Run `cmd` to its end while a TreeSampler watches it; its output (stderr merged) goes to the file `log`,
    or is kept as (arrival epoch seconds, line) pairs. Returns rc, start, end, seconds (wall), peak (the tree's
    RSS), processes and lines; a run past `timeout` is killed."""
    lines: list[tuple[float, str]] = []
    start = time.time()
    with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, bufsize=1, **popen)
        reader = threading.Thread(target=lambda: lines.extend((time.time(), x.rstrip("\n")) for x in proc.stdout),
                                  daemon=True) if not log else None
        if reader:
            reader.start()
        with TreeSampler(proc.pid, on_sample, interval) as sampler:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if reader:
            reader.join(5)
    end = time.time()
    return {"rc": proc.returncode, "start": start, "end": end, "seconds": end - start, "peak": sampler.peak,
            "processes": sampler.processes, "lines": lines}


# --- timing and repeats -----------------------------------------------------------------------------------


def busy_cpu_s() -> float:
    """The machine's busy CPU seconds since boot (user, nice, system, irq, softirq: /proc/stat, through psutil):
    every process's, those a run starts and ends included."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(wall seconds, fn(*args, **kwargs)), by perf_counter."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def run_timed(cmd: list, check: bool = True, **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    """(wall seconds, the finished process) of `cmd`, its output captured as text unless `stdout` is given. With
    `check`, a failure ends the benchmark with the command's last output."""
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    seconds, r = timed(subprocess.run, [str(c) for c in cmd], text=True, **kwargs)
    if check and r.returncode:
        raise SystemExit(f"{' '.join(str(c) for c in cmd[:4])} ... failed ({r.returncode}):\n"
                         f"{(r.stdout or '')[-2000:]}\n{(r.stderr or '')[-3000:]}")
    return seconds, r


def repeat(runs: dict, times: int, alternate: bool = False, report=None) -> dict[str, list]:
    """Each of `runs` (name -> fn(i)) `times` times, interleaved: every name once a round, the order reversed
    every other round with `alternate` (no side always first). `report(i, name, value)` after each."""
    out: dict[str, list] = {name: [] for name in runs}
    for i in range(times):
        for name in (list(runs)[::-1] if alternate and i % 2 else list(runs)):
            out[name].append(runs[name](i))
            if report:
                report(i, name, out[name][-1])
    return out


def flood(http, method: str, url: str, headers: dict, body: bytes | None, rounds: int, concurrency: int,
          deadline: float | None = None) -> dict:
    """`rounds` waves of `concurrency` requests at once through the urllib3 pool `http` (stopping at `deadline`,
    a time.time()): {"codes": {status: count}, "p50_ms", "p99_ms", "n"}."""
    from concurrent.futures import ThreadPoolExecutor

    latencies, codes = [], {}
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(rounds):
            if deadline is not None and time.time() > deadline:
                break
            for seconds, r in pool.map(lambda _: timed(http.request, method, url, body=body, headers=headers),
                                       range(concurrency)):
                latencies.append(seconds)
                codes[r.status] = codes.get(r.status, 0) + 1
    latencies.sort()
    return {"codes": codes, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))], "n": len(latencies)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- medians, spreads, summary rows -----------------------------------------------------------------------


def spread(values: list[float], kind: str = "range") -> list[float]:
    """[min, max] of `values`, or with kind="iqr" the first and third quartiles."""
    values = sorted(values)
    if kind == "iqr" and len(values) >= 2:
        q = statistics.quantiles(values, n=4, method="inclusive")
        return [q[0], q[2]]
    return [values[0], values[-1]]


def human(n: float) -> str:
    """A size for a metric's name: 500, 5k, 1.5M."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else f"{n:g}"


def row(area: str, metric: str, ours, peer=None, unit: str = "", goal: str | None = None,
        note: str | None = None) -> dict:
    """One summary row of a record. `ours` and `peer`: a figure or the list of its repeats (paired by index
    when both have the same length). ratio: the median of the per-repeat ratios ours / peer, spread: their min
    and max (unpaired repeats: the ratio of the medians, and the extreme pairs). goal: ">= X" or "<= X", judged
    on the ratio, or on ours where there is no peer."""
    ours_l = [v for v in (ours if isinstance(ours, (list, tuple)) else [ours]) if v is not None]
    peer_l = [v for v in (peer if isinstance(peer, (list, tuple)) else [peer]) if v is not None]
    out = {"area": area, "metric": metric, "ours": statistics.median(ours_l) if ours_l else None,
           "peer": statistics.median(peer_l) if peer_l else None, "ratio": None, "spread": None,
           "repeats": len(ours_l), "unit": unit}
    if ours_l and peer_l and all(peer_l):
        if len(ours_l) == len(peer_l):
            ratios = [o / p for o, p in zip(ours_l, peer_l)]
            out.update(ratio=statistics.median(ratios), spread=spread(ratios))
        else:
            out.update(ratio=out["ours"] / out["peer"], spread=[min(ours_l) / max(peer_l), max(ours_l) /
                                                                 min(peer_l)], repeats=min(len(ours_l), len(peer_l)))
    elif len(ours_l) > 1:
        out["spread"] = spread(ours_l)
    out.update({k: v for k, v in (("goal", goal), ("note", note)) if v})
    return out


# --- the record -------------------------------------------------------------------------------------------


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def commit() -> str:
    """The checkout's short hash, "-dirty" when a tracked file differs from it (the editable install runs the
    working tree)."""
    short = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    return short + ("-dirty" if git("diff", "--quiet", "HEAD", "--").returncode == 1 else "")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    try:
        from importlib.metadata import version

        torch = sys.modules["torch"].__version__ if "torch" in sys.modules else version("torch")
    except Exception:  # not installed
        torch = None
    return {"cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                         / GiB, 1),
            "cpu": cpu, "python": platform.python_version(), "torch": torch, "load_1min": round(os.getloadavg()[0], 2)}


def command() -> list[str]:
    """The argv as run: the interpreter and the script relative to the checkout when inside it."""
    def rel(p: str) -> str:
        return os.path.relpath(p, REPO) if os.path.isabs(p) and Path(p).is_relative_to(REPO) else p

    return [rel(sys.executable), rel(os.path.abspath(sys.argv[0])), *sys.argv[1:]]


def write_record(bench: str, figures: dict, summary: list[dict], **extra) -> Path:
    """Write (or rewrite) this run's record, bench/results/<bench>-<START>.json; returns its path."""
    path = RESULTS / f"{bench}-{START:%Y%m%dT%H%M%SZ}.json"
    seconds = (dt.datetime.now(dt.timezone.utc) - START).total_seconds()
    # `extra` comes after the defaults: it may name the commit (a fresh clone's, a GPU machine's)
    record = {"bench": bench, "command": command(), "commit": commit(), "date": START.isoformat(),
              "seconds": round(seconds, 1), "machine": machine(), **extra, "figures": figures, "summary": summary}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=_plain) + "\n")
    print(f"record: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
    return path


def _plain(value):
    """JSON for what json does not know: numpy scalars and arrays, sets, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def sweep_main(doc: str, make_npz, sweep, record, inputs: str, procs: bool = False) -> None:
    """The command line of a design sweep (bench/demo_*_sweep.py): write its inputs here (`--make-npz`), run it
    anywhere (`--npz`, on a GPU with `--device cuda`), then make the record from its JSON lines (`--record`)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--npz", help="the inputs (written by --make-npz)")
    parser.add_argument("--make-npz", metavar=inputs, help=f"write --npz from {inputs}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=[], help="configs by name (or its first word)")
    if procs:
        parser.add_argument("--procs", type=int, default=1, help="configs run at once (8 on one GPU)")
    parser.add_argument("--record", nargs="*", metavar="JSONL", help="write the record from sweep outputs")
    args = parser.parse_args()
    if args.record:
        record(args.record, args.device)
    elif args.make_npz:
        make_npz(args.make_npz, args.npz)
    elif args.npz:
        sweep(args.npz, args.device, args.only, *([args.procs] if procs else []))
    else:
        parser.error(f"give --make-npz {inputs} --npz FILE, --npz FILE, or --record JSONL...")
