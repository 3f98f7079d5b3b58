"""Ingest benchmark: the 4,009 Twemoji PNGs over loopback HTTP, resized to 64, three ways in one run.

  1. ours:        emoji-ldm dataset build --source urls:LIST (Ray Data -> Delta table)
  2. img2dataset: the field's standard downloader (in its own venv, .venv-img2dataset)
  3. seed loop:   sequential, the way the seed crawler works (download to hash,
                  download again, convert, resize, save, CSV)

Each runs as its own process; wall time includes start-up. Prints images/s for
each and ours / the faster peer.

    python bench/ingest.py [--limit N] [--repeat R]
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PEER_VENV = REPO / ".venv-img2dataset"

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_peer() -> Path:
    exe = PEER_VENV / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "--quiet", "img2dataset==1.47.0"], check=True)
    return exe


PHASES: list[dict] = []  # our per-phase timings, parsed from `emoji-ldm -v`


def timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    m = re.search(r"phases \(s\): (\{.*\})", r.stderr)
    if m:
        PHASES.append(ast.literal_eval(m.group(1)))
    return wall


def start_ray_head() -> str:
    """A local Ray head for the warm run (token auth off: loopback-only, this run only)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
    import ray._private.services as services

    return f"{services.get_node_ip_address()}:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="use the first N PNGs (default all 4,009)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best wall time is kept")
    args = parser.parse_args()

    from emoji_ldm.sources.twemoji import twemoji_dir

    img2dataset = ensure_peer()
    files = sorted(p.name for p in twemoji_dir().glob("*.png"))[: args.limit]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(twemoji_dir())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        time.sleep(1.0)
        urls = [f"http://127.0.0.1:{port}/{name}" for name in files]
        url_list = work / "urls.txt"
        url_list.write_text("\n".join(urls) + "\n")
        n = len(urls)

        ours_cmd = lambda out: [str(BIN / "emoji-ldm"), "-v", "dataset", "build", "--source",  # noqa: E731
                                f"urls:{url_list}", "--out", str(out), "--image-size", "64"]
        runs = {
            "ours (emoji-ldm dataset build)": lambda i: timed(ours_cmd(work / f"ours-{i}")),
            "ours, joining a running Ray (as a Ray Job)": lambda i: timed(
                ours_cmd(work / f"warm-{i}"), env={"RAY_ADDRESS": head}
            ),
            "img2dataset 1.47 (2 procs x 32 threads)": lambda i: timed(
                [str(img2dataset), "--url_list", str(url_list), "--input_format", "txt",
                 "--output_folder", str(work / f"i2d-{i}"), "--output_format", "files",
                 "--image_size", "64", "--resize_mode", "border", "--encode_format", "png",
                 "--encode_quality", "9", "--processes_count", "2", "--thread_count", "32",
                 "--number_sample_per_shard", "1000", "--disable_all_reencoding", "False"],
                env={"NO_ALBUMENTATIONS_UPDATE": "1"},
            ),
            "seed-style sequential loop": lambda i: timed(
                [sys.executable, "-c", SEED_LOOP, str(url_list), str(work / f"seed-{i}")]
            ),
        }
        head = start_ray_head()
        results = {}
        for name, run in runs.items():
            walls = [run(i) for i in range(args.repeat)]
            results[name] = min(walls)
            print(f"{name:42s} {n:5d} images  {results[name]:7.1f} s  {n / results[name]:7.0f} images/s", flush=True)
        ours = n / results["ours (emoji-ldm dataset build)"]
        warm = n / results["ours, joining a running Ray (as a Ray Job)"]
        peers = {k: n / v for k, v in results.items() if not k.startswith("ours")}
        ingest_only = min(p["ingest"] for p in PHASES)
        print(f"ours, Ray Data ingest stage alone: {n / ingest_only:.0f} images/s "
              f"(phases of our fastest run: {min(PHASES, key=lambda p: sum(p.values()))})")
        best_name, best = max(peers.items(), key=lambda kv: kv[1])
        i2d = peers["img2dataset 1.47 (2 procs x 32 threads)"]
        print(f"ours / img2dataset = {ours / i2d:.2f}x; ours / faster peer ({best_name}) = {ours / best:.2f}x")
        print(f"ours joining a running Ray / faster peer = {warm / best:.2f}x")
        print(f"date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores")
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
