"""Serving benchmark: a naive server vs our Ray Serve deployment, same model, same run.

  naive: one process, one diffusers pipeline, one pipeline call per request, requests
         served one at a time on the main thread (a pipeline is not thread-safe), 2 torch
         threads; the way the seed served its demo.
  ours:  `emoji-ldm serve` (Ray Serve: FastAPI ingress -> Generator with @serve.batch),
         one Generator replica with 2 torch threads, max batch 32 images.

Closed-loop load at concurrency 1, 8 and 32: each client thread sends POST /v1/generate
(n=1, 25 DPM-Solver++ steps) back to back; throughput = images / wall time, latency per
request. Then the bulk job (`emoji-ldm bulk`) on the same model: images/s.

Needs a trained model (`make demo` leaves one in demo-out/run).

    python bench/serve.py [--model demo-out/run] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, free_port, row, run_timed, timed, write_record

BIN = Path(sys.executable).parent
PROMPTS = ["smiling cat face", "red heart", "pizza", "thumbs up", "ghost", "sun", "crying face", "rocket"]

BENCH_SERVE_CONFIG = """
proxy_location: EveryNode
http_options: {host: 127.0.0.1, port: 8000, request_timeout_s: 600}
applications:
  - name: emoji
    route_prefix: /
    import_path: emoji_ldm.serve.app:build_app
    args: {model: unused, max_batch_size: 32, batch_wait_timeout_s: 0.1, torch_threads: 2}
    deployments:
      - {name: Generator, num_replicas: 1, max_ongoing_requests: 64, max_queued_requests: 512,
         ray_actor_options: {num_cpus: 1}}
      - {name: Ingress, num_replicas: 1, max_ongoing_requests: 256, max_queued_requests: 512,
         ray_actor_options: {num_cpus: 0.25}}
"""


# --- the naive server (run in its own process) --------------------------------------


def naive_server(model: str, port: int) -> None:
    import base64
    import io
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import torch

    from emoji_ldm.inference.sampler import load_pipeline

    torch.set_num_threads(2)
    pipe = load_pipeline(model)
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with torch.no_grad():
                image = pipe(body["prompt"], num_inference_steps=body["steps"], guidance_scale=body["guidance"],
                             generator=torch.Generator("cpu").manual_seed(body["seed"])).images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    # one thread: torch on a new thread per request would start a new OpenMP team each time
    # (see the Generator deployment), which would make the baseline slower than it need be
    class Server(HTTPServer):
        request_queue_size = 128  # the default 5 would refuse connections at concurrency 32

    Server(("127.0.0.1", port), Handler).serve_forever()


def ceiling(model: str, steps: int) -> dict:
    """What batching can give on this machine: the pipeline alone (no server), batch 1 vs 8 vs 32."""
    import torch

    from emoji_ldm.inference.sampler import SampleJob, Sampler

    torch.set_num_threads(2)
    sampler = Sampler.load(model)
    out = {}
    for batch in (1, 8, 32):
        job = SampleJob(("red heart",) * batch, tuple(range(batch)), steps=steps)
        sampler.sample([job])  # warm-up
        reps = max(1, 32 // batch)
        seconds, _ = timed(lambda job=job, reps=reps: [sampler.sample([job]) for _ in range(reps)])
        out[f"batch_{batch}"] = batch * reps / seconds
    return out


# --- load --------------------------------------------------------------------------


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import urllib3

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if urllib3.request("GET", url + "/healthz", timeout=2).status == 200:
                return
        except Exception:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


def run_load(url: str, concurrency: int, requests: int, steps: int) -> dict:
    import urllib3

    http = urllib3.PoolManager(maxsize=concurrency + 4, timeout=urllib3.Timeout(connect=5, read=600), retries=False)
    latencies, failures = [], 0
    counter = iter(range(requests))
    lock = threading.Lock()

    def client(_):
        nonlocal failures
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "steps": steps, "guidance": 5.0, "seed": i})
            seconds, resp = timed(http.request, "POST", url + "/v1/generate", body=body,
                                  headers={"content-type": "application/json"})
            with lock:
                if resp.status == 200:
                    latencies.append(seconds)
                else:
                    failures += 1

    with ThreadPoolExecutor(concurrency) as pool:
        wall, _ = timed(lambda: list(pool.map(client, range(concurrency))))
    latencies.sort()
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {"concurrency": concurrency, "requests": requests, "ok": len(latencies), "failed": failures,
            "wall_s": wall, "images_per_s": len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": q[18]}


def measure(name: str, url: str, concurrencies: list[int], steps: int) -> list[dict]:
    run_load(url, 4, 8, steps)  # warm-up: imports, first calls, batch queues
    rows = []
    for c in concurrencies:
        row = {"server": name, **run_load(url, c, max(24, 4 * c), steps)}
        print(f"{name:>6} c={c:<3} {row['images_per_s']:6.2f} images/s  p50 {row['p50_s']:.2f} s  "
              f"p95 {row['p95_s']:.2f} s  ({row['ok']} ok, {row['failed']} failed)", flush=True)
        rows.append(row)
    return rows


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "demo-out" / "run"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--bulk-prompts", type=int, default=128, help="prompts for the bulk job (x4 images)")
    parser.add_argument("--naive-server", type=int, help=argparse.SUPPRESS)  # internal: run the naive server
    parser.add_argument("--ceiling", action="store_true", help=argparse.SUPPRESS)  # internal: pipeline alone
    args = parser.parse_args()
    if args.naive_server:
        return naive_server(args.model, args.naive_server)
    if args.ceiling:
        return print(json.dumps(ceiling(args.model, args.steps)))
    if not Path(args.model).exists():
        raise SystemExit(f"no model at {args.model}: run `make demo` first")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    results = {"model": args.model, "steps": args.steps}

    limit = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--ceiling"],
                           env=env, capture_output=True, text=True, check=True)
    results["pipeline_alone"] = json.loads(limit.stdout.strip().splitlines()[-1])
    print("pipeline alone, images/s: " + ", ".join(f"{k} {v:.2f}" for k, v in results["pipeline_alone"].items())
          + f"  (batching ceiling {results['pipeline_alone']['batch_32'] / results['pipeline_alone']['batch_1']:.2f}x)",
          flush=True)

    port = free_port()
    naive = subprocess.Popen([sys.executable, __file__, "--model", args.model, "--naive-server", str(port)],
                             env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        wait_up(f"http://127.0.0.1:{port}", naive)
        rows = measure("naive", f"http://127.0.0.1:{port}", args.concurrency, args.steps)
    finally:
        stop(naive)

    config = work / "serve_config.yaml"
    config.write_text(BENCH_SERVE_CONFIG)
    port = free_port()
    log = open(work / "serve.log", "w")
    ours = subprocess.Popen([str(BIN / "emoji-ldm"), "serve", "--model", args.model, "--port", str(port),
                             "--config", str(config)], env=env, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_up(f"http://127.0.0.1:{port}", ours)
        rows += measure("ours", f"http://127.0.0.1:{port}", args.concurrency, args.steps)
    finally:
        stop(ours)
    results["load"] = rows

    prompts = work / "prompts.txt"
    import emoji

    names = [emoji.demojize(e).strip(":").replace("_", " ") for e in emoji.EMOJI_DATA]
    prompts.write_text("\n".join(list(dict.fromkeys(names))[: args.bulk_prompts]))
    wall, bulk = run_timed([str(BIN / "emoji-ldm"), "bulk", "--model", args.model, "--prompts", str(prompts),
                            "--out", str(work / "bulk"), "--per-prompt", "4", "--steps", str(args.steps),
                            "--num-cpus", "2", "--batch-size", "32"], env=env)
    bulk_line = next((line for line in reversed(bulk.stdout.splitlines()) if line.startswith("bulk:")), "")
    images = args.bulk_prompts * 4
    results["bulk"] = {"images": images, "wall_s": wall, "images_per_s": images / wall, "bulk_line": bulk_line}
    print(f"  bulk {images} images in {wall:.1f} s = {images / wall:.2f} images/s end to end; {bulk_line}")

    print("\nratio ours/naive (images/s):")
    summary, alone = [], results["pipeline_alone"]
    for c in args.concurrency:
        n = next(r for r in rows if r["server"] == "naive" and r["concurrency"] == c)
        o = next(r for r in rows if r["server"] == "ours" and r["concurrency"] == c)
        print(f"  c={c:<3} {o['images_per_s'] / n['images_per_s']:.2f}x  (p50 {n['p50_s']:.2f} -> {o['p50_s']:.2f} s, "
              f"p95 {n['p95_s']:.2f} -> {o['p95_s']:.2f} s)")
        summary.append(row("serve", f"images/s at concurrency {c}", o["images_per_s"], n["images_per_s"], "images/s",
                           ">= 3" if c >= 8 else None))
    summary += [row("serve", "the ceiling: the pipeline alone at batch 32 vs batch 1", alone["batch_32"],
                    alone["batch_1"], "images/s"), row("serve", f"`emoji-ldm bulk`, {images} images end to end (Ray "
                                                       "start, model load)", images / wall, None, "images/s")]
    write_record("serve", results, summary, about=f"POST /v1/generate (n=1, {args.steps} steps), closed-loop load; "
                 "ours: `emoji-ldm serve` (one Generator replica); peer: a naive one-request-at-a-time server.")


if __name__ == "__main__":
    main()
