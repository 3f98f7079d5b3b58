"""Ingest benchmark: the 4,009 Twemoji PNGs over loopback HTTP, resized to 64, three ways in one run.

  1. ours:        emoji-ldm dataset build --source urls:LIST (Ray Data -> Delta table)
  2. img2dataset: the field's standard downloader
  3. seed loop:   sequential, the way the seed crawler works (download to hash,
                  download again, convert, resize, save, CSV)

Ours runs from .venv; the two peers run from .venv-peers, a virtualenv of their own
(img2dataset 1.47 needs pandas<3, the project pins pandas 3.1), which `make .venv-peers`
creates (`make bench` does it first). Each runs as its own process; wall time includes
start-up. Prints images/s for each and ours / the faster peer.

    make bench   (or: make .venv-peers && .venv/bin/python bench/ingest.py [--limit N] [--repeat R])
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, free_port, repeat, row, run_timed, write_record

BIN = Path(sys.executable).parent
PEER_VENV = REPO / ".venv-peers"
PEER_BIN = PEER_VENV / "bin"

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


PHASES: list[dict] = []  # our per-phase timings, parsed from `emoji-ldm -v`


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="use the first N PNGs (default all 4,009)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, interleaved; the best is printed, "
                        "every run recorded")
    args = parser.parse_args()

    from emoji_ldm.sources.twemoji import twemoji_dir

    check_peers()
    files = sorted(p.name for p in twemoji_dir().glob("*.png"))[: args.limit]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(twemoji_dir())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    head_proc = None
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
                [str(PEER_BIN / "img2dataset"), "--url_list", str(url_list), "--input_format", "txt",
                 "--output_folder", str(work / f"i2d-{i}"), "--output_format", "files",
                 "--image_size", "64", "--resize_mode", "border", "--encode_format", "png",
                 "--encode_quality", "9", "--processes_count", "2", "--thread_count", "32",
                 "--number_sample_per_shard", "1000", "--disable_all_reencoding", "False"],
                env={"NO_ALBUMENTATIONS_UPDATE": "1"},
            ),
            "seed-style sequential loop": lambda i: timed(
                [str(PEER_BIN / "python"), "-c", SEED_LOOP, str(url_list), str(work / f"seed-{i}")]
            ),
        }
        head, head_proc = start_ray_head(work / "ray")
        walls = repeat(runs, args.repeat, report=lambda i, name, wall: print(
            f"{name:42s} {n:5d} images  {wall:7.1f} s  {n / wall:7.0f} images/s (run {i + 1})", flush=True))
        results = {name: min(w) for name, w in walls.items()}  # the best of each
        cold, warm_name, i2d_name = list(runs)[:3]
        ours, warm = n / results[cold], n / results[warm_name]
        peers = {k: n / v for k, v in results.items() if not k.startswith("ours")}
        staged = [p for p in PHASES if "ingest" in p]  # when `-v` logs per-phase times
        if staged:
            print(f"ours, Ray Data ingest stage alone: {n / min(p['ingest'] for p in staged):.0f} images/s "
                  f"(phases of our fastest run: {min(staged, key=lambda p: sum(p.values()))})")
        best_name, best = max(peers.items(), key=lambda kv: kv[1])
        print(f"best of {args.repeat}: ours / img2dataset = {ours / peers[i2d_name]:.2f}x; ours / faster peer "
              f"({best_name}) = {ours / best:.2f}x; ours joining a running Ray / faster peer = {warm / best:.2f}x")
        rate = {name: [n / w for w in ws] for name, ws in walls.items()}
        write_record("ingest", {"images": n, "wall_s": walls, "phases": PHASES}, [
            row("ingest", f"images/s, {name} vs {i2d_name}", rate[name], rate[i2d_name], "images/s", ">= 2")
            for name in (cold, warm_name)], about="the Twemoji PNGs over loopback HTTP, resized to 64 px, each way in "
            "its own process; peers: img2dataset and the seed's loop, from .venv-peers.")
    finally:
        stop_ray_head(head_proc)
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
