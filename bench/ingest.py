"""Ingest benchmark: N distinct images over loopback HTTP, resized to 64, three ways in one run, same URL list.

  1. ours:          emoji-ldm dataset build --source urls:LIST, starting its own Ray (Ray Data -> Delta table)
  2. ours, joining: the same, joining a running Ray head (RAY_ADDRESS), as a Ray Job would
  3. img2dataset:   the field's standard downloader, with its best settings for 2 cores
  (4. with --seed-loop: the seed's sequential loop: download to hash, download again, convert, resize, save)

The images: the distinct Twemoji PNGs (3,973 of the 4,009), then marked copies up to --images (a copy has a coloured
6 x 6 mark in one corner whose colour encodes the copy's number, so its 64 px pixels, and its content hash,
differ from every other image's: de-duplication keeps every one and both tools fetch, process and keep all N).
The copies are made once into a cache folder (EMOJI_LDM_BENCH_IMAGES, default /tmp/emoji-ldm-bench-images).

Ours runs from .venv; the peers from .venv-peers (img2dataset 1.47 needs pandas<3; `make .venv-peers`). Each
way runs as its own process, wall time including start-up, interleaved --repeat times. With --profile, one more
warm run of ours is sampled by py-spy inside the Ray workers: the share of the per-image work in decode, resize,
encode, hash and download, recorded with the figures.

    make bench   (or: .venv/bin/python bench/ingest.py [--images N] [--repeat R] [--profile] [--seed-loop])
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, free_port, repeat, row, run_timed, spread, write_record

BIN = Path(sys.executable).parent
PEER_VENV = REPO / ".venv-peers"
PEER_BIN = PEER_VENV / "bin"
TWEMOJI = 3973  # the distinct ones of the 4,009 Twemoji PNGs
# img2dataset's settings for 2 cores (processes x threads), chosen with --try-img2dataset: at 4,000 images on
# 2026-11-26, 2 x 32 183 images/s, 2 x 16 178, 4 x 16 161, 1 x 64 152 (one run each, a busy machine)
I2D_SETTINGS = {"processes_count": 2, "thread_count": 32}

# The image host: Python's file server, speaking HTTP/1.1 with TCP_NODELAY as web servers do (nginx's default): a
# client may keep its connection for the next image (`python -m http.server` speaks HTTP/1.0, one connection per
# image whoever the client), and no reply waits 40 ms on Nagle's algorithm for the ACK of its headers.
SERVER = r'''
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])),
                                functools.partial(Handler, directory=sys.argv[2])).serve_forever()
'''

SEED_LOOP = r'''
import csv, hashlib, io, sys, os
import requests
from PIL import Image
urls = open(sys.argv[1]).read().split()
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
seen, rows = set(), []
for i, url in enumerate(urls):
    data = requests.get(url, timeout=10).content          # download to hash
    h = hashlib.md5(data).hexdigest()
    if h in seen:
        continue
    seen.add(h)
    data = requests.get(url, timeout=10).content          # download again
    img = Image.open(io.BytesIO(data)).convert("RGBA")
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(bg, img).convert("RGB")
    img.thumbnail((64, 64))
    canvas = Image.new("RGB", (64, 64), "white")
    canvas.paste(img, ((64 - img.width) // 2, (64 - img.height) // 2))
    name = f"{h}.png"
    canvas.save(os.path.join(out, name))
    rows.append({"file_name": name, "image_url": url, "image_title": "", "tag": ""})
with open(os.path.join(out, "metadata.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["file_name", "image_url", "image_title", "tag"])
    w.writeheader()
    w.writerows(rows)
print(len(rows))
'''


def check_peers() -> None:
    """The peers' venv must hold img2dataset and what the seed loop imports."""
    exe = PEER_BIN / "img2dataset"
    probe = subprocess.run([str(PEER_BIN / "python"), "-c", "import requests, PIL, img2dataset"],
                           capture_output=True, text=True) if exe.exists() else None
    if probe is None or probe.returncode != 0:
        detail = probe.stderr.strip().splitlines()[-1] if probe and probe.stderr.strip() else f"no {exe}"
        raise SystemExit(f"the peers' virtualenv {PEER_VENV} is missing or incomplete ({detail}): "
                         "run `make .venv-peers` (or `make bench`)")


def _mark(job: tuple[str, str, int]) -> None:
    """Copy `k` of one Twemoji PNG: a 6 x 6 mark in a corner, its colour the copy's number."""
    from PIL import Image

    src, dst, k = job
    img = Image.open(src).convert("RGBA")
    colour = (40 * (k % 6) + 30, 255 - 25 * (k // 6 % 10), 60 * (k // 60 % 4) + 20, 255)
    corner = [(0, 0), (img.width - 6, 0), (0, img.height - 6), (img.width - 6, img.height - 6)][k // 240 % 4]
    img.paste(colour, (*corner, corner[0] + 6, corner[1] + 6))
    img.save(dst, compress_level=1)


def distinct_twemoji(cache: Path) -> list[str]:
    """The Twemoji PNGs less those whose stored 64 px pixels equal an earlier one's (a few dozen are the same
    picture under two code points): names, cached in `cache`."""
    from emoji_ldm.imaging import ImageConfig, clean_image
    from emoji_ldm.sources.twemoji import twemoji_dir

    if cache.exists():
        return cache.read_text().split()
    seen, names = set(), []
    for path in sorted(twemoji_dir().glob("*.png")):
        cleaned = clean_image(path.read_bytes(), ImageConfig())
        if getattr(cleaned, "id", None) and cleaned.id not in seen:
            seen.add(cleaned.id)
            names.append(path.name)
    cache.write_text("\n".join(names) + "\n")
    return names


def image_folder(n: int) -> tuple[Path, list[str]]:
    """A folder holding the distinct Twemoji PNGs and, past them, marked copies: (the folder, n file names)."""
    from multiprocessing import Pool

    from emoji_ldm.sources.twemoji import twemoji_dir

    folder = Path(os.environ.get("EMOJI_LDM_BENCH_IMAGES", "/tmp/emoji-ldm-bench-images"))
    folder.mkdir(parents=True, exist_ok=True)
    originals = distinct_twemoji(folder / "distinct.txt")
    for name in originals:
        if not (folder / name).exists():
            (folder / name).symlink_to(twemoji_dir() / name)
    names, jobs = list(originals[:n]), []
    for i in range(len(originals), n):
        k, name = i // len(originals), originals[i % len(originals)]
        names.append(f"copy{k}-{name}")
        if not (folder / names[-1]).exists():
            jobs.append((str(twemoji_dir() / name), str(folder / names[-1]), k))
    if jobs:
        print(f"making {len(jobs)} marked copies in {folder}", flush=True)
        with Pool(2) as pool:
            pool.map(_mark, jobs, chunksize=200)
    return folder, names


PHASES: list[dict] = []  # our per-phase timings, from the `phases (s)` line `emoji-ldm -v` logs


def timed(cmd: list[str], env: dict | None = None) -> float:
    wall, r = run_timed(cmd, env={**os.environ, **(env or {})})
    m = re.search(r"phases \(s\): (\{.*\})", r.stderr)
    if m:
        PHASES.append(ast.literal_eval(m.group(1)))
    return wall


def start_ray_head(temp_dir: Path) -> tuple[str, subprocess.Popen]:
    """A local Ray head for the warm run (token auth off: loopback-only, this run only).

    Private to this run, on a machine others may share: `ray start --block` in a session of its own,
    so that stop_ray_head ends this head alone (`ray stop` would stop every Ray on the machine), and
    its own --temp-dir, so that its address is not written to /tmp/ray/ray_current_cluster, where
    any `ray.init()` on the machine would find and join it (and, once it is gone, hang on it)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = free_port()
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import ray._private.services as services

    address = f"{services.get_node_ip_address()}:{port}"
    deadline = time.time() + 180
    while subprocess.run([str(BIN / "ray"), "status", "--address", address], capture_output=True).returncode:
        if proc.poll() is not None or time.time() > deadline:
            stop_ray_head(proc)
            raise RuntimeError(f"the Ray head at {address} did not come up")
        time.sleep(2)
    return address, proc


def stop_ray_head(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the head shuts down the processes it started
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


# Where a sample of the ingest tasks' work falls: the first category with a key in its stack.
CATEGORIES = [("encode (PNG)", ("PngImagePlugin.py",)), ("hash", ("content_hash (",)),
              ("resize (Lanczos, alpha, canvas)", ("_fit (",)), ("decode", ("_decode (",)),
              ("download (urllib3)", ("fetch_bytes (",)), ("waiting (locks, queues)", ("threading.py", "queue.py")),
              ("write (Parquet, keys)", ("sinks.py", "delta.py")), ("rows (Arrow <-> Python)", ("ingest_batch (",))]


def profile_summary(raw: Path) -> dict:
    """py-spy's raw (collapsed) stacks of the Ray workers -> the share of the ingest tasks' samples per
    category (threads that wait on a lock or a queue are counted apart, not in the shares)."""
    counts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or not any(k in stack for k in ("emoji_ldm/ingest/", "emoji_ldm/imaging")):
            continue
        kind = next((k for k, keys in CATEGORIES if any(key in stack for key in keys)), "other")
        counts[kind] = counts.get(kind, 0) + int(n)
    waiting = counts.pop("waiting (locks, queues)", 0)
    total = sum(counts.values()) or 1
    return {"samples": total, "waiting_samples": waiting,
            "share": {k: round(v / total, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}


def profiled(cmd: list[str], head_proc: subprocess.Popen, out: Path, env: dict) -> dict:
    """One more warm run of ours with py-spy recording every process of the head (the Ray workers)."""
    raw = out / "profile.txt"
    spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(head_proc.pid), "--subprocesses",
                            "--format", "raw", "--rate", "50", "--nonblocking", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    wall = timed(cmd, env=env)
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
    if not raw.exists():
        return {"error": (spy.stderr.read() or "py-spy wrote nothing")[-300:], "wall_s": wall}
    return {"wall_s": wall, **profile_summary(raw)}


def img2dataset(url_list: Path, out: Path, processes_count: int, thread_count: int) -> float:
    """img2dataset writing Parquet shards of PNG bytes, as ours writes a table of them (its `files` writer, one file
    per image, is different work)."""
    return timed([str(PEER_BIN / "img2dataset"), "--url_list", str(url_list), "--input_format", "txt",
                  "--output_folder", str(out), "--output_format", "parquet", "--image_size", "64", "--resize_mode",
                  "border", "--encode_format", "png", "--encode_quality", "9", "--processes_count",
                  str(processes_count), "--thread_count", str(thread_count), "--number_sample_per_shard", "1000",
                  "--disable_all_reencoding", "False"], env={"NO_ALBUMENTATIONS_UPDATE": "1"})


def try_img2dataset(url_list: Path, work: Path, settings: str, times: int) -> None:
    """img2dataset alone with each PROCSxTHREADS setting, interleaved: images/s of each run."""
    n = len(url_list.read_text().split())
    def run(setting: str):
        procs, threads = map(int, setting.split("x"))
        return lambda i: img2dataset(url_list, work / f"try-{setting}-{i}", procs, threads)

    runs = {setting: run(setting) for setting in settings.split(",")}
    walls = repeat(runs, times, alternate=True, report=lambda i, name, wall: print(
        f"img2dataset {name:8s} {n:6d} images  {wall:7.1f} s  {n / wall:7.0f} images/s (run {i + 1})", flush=True))
    write_record("ingest_img2dataset_settings", {"images": n, "wall_s": walls}, [],
                 about="img2dataset alone, processes x threads, to pick its best settings for 2 cores")


def ways(url_list: Path, work: Path, head: str, seed_loop: bool) -> dict:
    """name -> fn(run number) -> wall seconds, for each way of ingesting the list."""
    ours = lambda out: [str(BIN / "emoji-ldm"), "-v", "dataset", "build", "--source",  # noqa: E731
                        f"urls:{url_list}", "--out", str(out), "--image-size", "64"]
    i2d = f"img2dataset 1.47 ({I2D_SETTINGS['processes_count']} procs x {I2D_SETTINGS['thread_count']} threads)"
    runs = {
        "ours (emoji-ldm dataset build)": lambda i: timed(ours(work / f"ours-{i}"), env={"RAY_ADDRESS": ""}),
        "ours, joining a running Ray (as a Ray Job)": lambda i: timed(ours(work / f"warm-{i}"),
                                                                     env={"RAY_ADDRESS": head}),
        i2d: lambda i: img2dataset(url_list, work / f"i2d-{i}", **I2D_SETTINGS),
    }
    if seed_loop:
        runs["seed-style sequential loop"] = lambda i: timed(
            [str(PEER_BIN / "python"), "-c", SEED_LOOP, str(url_list), str(work / f"seed-{i}")])
    return runs


def check_kept(work: Path, n: int) -> dict:
    """How many images each way kept in its last run (every one should: the images are distinct)."""
    import deltalake

    kept = {}
    for prefix in ("ours", "warm"):
        last = sorted(work.glob(f"{prefix}-*"))
        if last:
            kept[prefix] = deltalake.DeltaTable(str(last[-1])).to_pyarrow_dataset().count_rows()
    last = sorted(work.glob("i2d-*"))
    if last:
        import pyarrow.dataset as pads

        shards = pads.dataset([str(f) for f in last[-1].rglob("*.parquet")], format="parquet")
        kept["img2dataset"] = shards.count_rows(filter=pads.field("png").is_valid())  # a failed row: png null
    short = {k: v for k, v in kept.items() if v != n}
    if short:
        print(f"WARNING: not every image kept: {short} of {n}", flush=True)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=TWEMOJI, help="distinct images (Twemoji, then marked "
                        "copies; default the 3,973 distinct Twemoji)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, interleaved; every run recorded")
    parser.add_argument("--profile", action="store_true", help="one more warm run of ours under py-spy")
    parser.add_argument("--seed-loop", action="store_true", help="the seed's sequential loop too (slow)")
    parser.add_argument("--try-img2dataset", metavar="PxT,PxT", help="img2dataset alone with these processes x "
                        "threads settings (e.g. 2x16,2x32,4x16), nothing else")
    args = parser.parse_args()

    check_peers()
    folder, files = image_folder(args.images)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    head_proc = None
    try:
        time.sleep(1.0)
        url_list = work / "urls.txt"
        url_list.write_text("".join(f"http://127.0.0.1:{port}/{name}\n" for name in files))
        n = len(files)
        if args.try_img2dataset:
            return try_img2dataset(url_list, work, args.try_img2dataset, args.repeat)
        head, head_proc = start_ray_head(work / "ray")
        runs = ways(url_list, work, head, args.seed_loop)
        walls = repeat(runs, args.repeat, alternate=True, report=lambda i, name, wall: print(
            f"{name:42s} {n:6d} images  {wall:7.1f} s  {n / wall:7.0f} images/s (run {i + 1})", flush=True))
        kept = check_kept(work, n)
        cold, warm, i2d = list(runs)[:3]
        rate = {name: [n / w for w in ws] for name, ws in walls.items()}
        for name in (cold, warm):
            ratios = [o / p for o, p in zip(rate[name], rate[i2d])]
            print(f"{name} / img2dataset: {statistics.median(ratios):.2f}x "
                  f"(runs {', '.join(f'{r:.2f}' for r in ratios)}; spread {spread(ratios)})", flush=True)
        staged = [p for p in PHASES if "ingest" in p]
        if staged:
            print(f"ours, the Ray Data ingest stage alone: {n / min(p['ingest'] for p in staged):.0f} images/s "
                  f"(phases of the fastest run: {min(staged, key=lambda p: sum(p.values()))})", flush=True)
        prof = None
        if args.profile:
            prof = profiled([str(BIN / "emoji-ldm"), "-v", "dataset", "build", "--source", f"urls:{url_list}",
                             "--out", str(work / "profiled"), "--image-size", "64"], head_proc, work,
                            {"RAY_ADDRESS": head})
            print(f"profile of the ingest tasks (py-spy in the Ray workers): {prof}", flush=True)
        write_record("ingest", {"images": n, "wall_s": walls, "images_per_s": rate, "kept": kept,
                                "phases": PHASES, "img2dataset_settings": I2D_SETTINGS, "profile": prof}, [
            row("ingest", f"images/s at {n:,}, {name} vs {i2d}", rate[name], rate[i2d], "images/s",
                ">= 2" if name == warm else ">= 1.2") for name in (cold, warm)],
            about=f"{n:,} distinct PNGs (Twemoji and marked copies) over loopback HTTP/1.1 (Python's threaded file "
                  "server), resized to 64 px, each way in its own process, interleaved; peer: img2dataset from "
                  ".venv-peers.")
    finally:
        stop_ray_head(head_proc)
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
