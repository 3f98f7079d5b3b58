"""Jobs and keys benchmark (issue 26), ours against the peer in the same run, on one local Ray.

1. A 512-emoji set as a durable job (POST /v1/jobs, polled to `succeeded`, zip and manifest written) against
   `emoji-ldm bulk` (`bulk_generate`, the same function the CLI calls) drawing the same 512 prompts with the
   same settings, seeds, batch size and CPUs. Ratio = job wall time / bulk wall time (goal <= 1.1).
2. Unauthenticated floods: 200 concurrent requests at a time (5 rounds) to POST /v1/generate without a key
   (401), then with a key over its rate (429); p50/p99 latency, and the Generator replica's request counter
   before and after (it must not move: no model work for a refused caller). The reference is the same flood
   to GET /healthz (no key needed, no model work), the cheapest answer the service gives.

Needs a trained model (`make demo` leaves one in demo-out/run).

    python bench/jobs.py [--model demo-out/run] [--images 512] [--steps 25]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import urllib3
from common import REPO, flood, free_port, row, timed, write_record

sys.path.insert(0, str(REPO))
WORDS = ["cat", "dog", "heart", "star", "sun", "moon", "pizza", "rocket", "ghost", "tree", "fish", "bird", "cake",
         "fire", "leaf", "skull"]
MOODS = ["happy", "sad", "angry", "sleepy", "surprised", "cool", "shy", "silly"]
STYLES = ["blob", "flat", "pixel", "neon"]
HTTP = urllib3.PoolManager(maxsize=256, retries=False, timeout=urllib3.Timeout(connect=10, read=600))


def prompts(n: int) -> list[str]:
    out = [f"{m} {w} {s}" for s in STYLES for m in MOODS for w in WORDS]
    return (out * (n // len(out) + 1))[:n] if n > len(out) else out[:n]


def run_bulk(model: str, items: list[str], out: Path, steps: int, batch: int, cpus: float) -> float:
    from emoji_ldm.inference.bulk import BulkConfig, bulk_generate
    from emoji_ldm.inference.settings import SamplerSettings

    prompt_file = out / "prompts.txt"
    prompt_file.write_text("\n".join(items) + "\n")
    seconds, summary = timed(bulk_generate, BulkConfig(model=model, prompts=str(prompt_file), out=str(out / "bulk"),
                                                       sampler=SamplerSettings(steps=steps, seed=0, count=1),
                                                       batch_size=batch, num_cpus=cpus))
    assert summary["images"] == len(items), summary
    return seconds


def run_job(url: str, items: list[str], steps: int) -> tuple[float, dict]:
    body = {"theme": "", "template": "{item}", "items": items, "steps": steps, "seed": 0}

    def submit_and_wait() -> dict:
        answer = HTTP.request("POST", f"{url}/v1/jobs", body=json.dumps(body),
                              headers={"content-type": "application/json"})
        assert answer.status == 202, answer.data
        job = json.loads(answer.data)
        while True:
            state = json.loads(HTTP.request("GET", f"{url}/v1/jobs/{job['id']}").data)
            if state["state"] in ("succeeded", "failed", "cancelled"):
                return state
            time.sleep(0.2)

    seconds, state = timed(submit_and_wait)
    assert state["state"] == "succeeded" and state["progress"]["done"] == len(items), state
    return seconds, state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(REPO / "demo-out" / "run"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cpus", type=float, default=2)
    args = parser.parse_args()

    import ray
    from ray import serve

    from emoji_ldm.serve.app import application
    from emoji_ldm.serve.keys import KeysCreateConfig, create_command

    # 4 logical CPUs on the 2 cores: the idle Generator replica holds 0.5 while an actor draws with 2
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    items = prompts(args.images)
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    print(f"{len(items)} images, {args.steps} steps, "
          f"batch {args.batch}, {args.cpus:g} CPUs for the bulk actor and for the job's runner; model {args.model}",
          flush=True)
    bulk_s = run_bulk(args.model, items, tmp, args.steps, args.batch, args.cpus)
    print(f"bulk: {bulk_s:.1f} s ({len(items) / bulk_s:.2f} images/s)", flush=True)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployments = [{"name": "Generator", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                   {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 512, "max_queued_requests": 1024,
                    "ray_actor_options": {"num_cpus": 0.25}}]
    base = {"model": args.model, "max_batch_size": args.batch, "jobs_uri": str(tmp / "jobs"),
            "job_num_cpus": args.cpus}
    serve.run(application(base, deployments), name="emoji", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    job_s, state = run_job(url, items, args.steps)
    print(f"job:  {job_s:.1f} s ({len(items) / job_s:.2f} images/s), result {state['result']['uri']}", flush=True)
    print(f"job / bulk = {job_s / bulk_s:.3f} (goal <= 1.1)", flush=True)

    # the same app with API keys, for the floods
    keys = tmp / "keys.json"
    lines = create_command(KeysCreateConfig(file=str(keys), name="metered", rate=1)).splitlines()
    serve.run(application({**base, "keys": str(keys)}, deployments), name="emoji", route_prefix="/")
    generator = serve.get_deployment_handle("Generator", app_name="emoji")
    before = generator.stats.remote().result()["requests"]
    body = json.dumps({"prompt": "cat", "steps": args.steps}).encode()
    json_h = {"content-type": "application/json"}
    flood(HTTP, "GET", f"{url}/healthz", {}, None, 1, 200)  # warm-up: the client's 200 connections, not measured
    results = {
        "GET /healthz (reference)": flood(HTTP, "GET", f"{url}/healthz", {}, None, 5, 200),
        "401 no key": flood(HTTP, "POST", f"{url}/v1/generate", json_h, body, 5, 200),
        "401 wrong key": flood(HTTP, "POST", f"{url}/v1/generate", {**json_h, "authorization": "Bearer eml_wrong"},
                               body, 5, 200),
    }
    HTTP.request("POST", f"{url}/v1/generate", body=body, headers={**json_h, "authorization": f"Bearer {lines[2]}"})
    over = {**json_h, "authorization": f"Bearer {lines[2]}"}
    results["429 over rate"] = flood(HTTP, "POST", f"{url}/v1/generate", over, body, 5, 200)
    after = generator.stats.remote().result()["requests"]
    for name, r in results.items():
        print(f"{name:26s} n={r['n']} codes={r['codes']} p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms")
    print(f"Generator requests during the floods: {after - before} (the one keyed request within the rate: 1)")
    rows = [row("jobs", f"wall time of {len(items)} images: a set job (POST /v1/jobs) vs `emoji-ldm bulk`", job_s,
                bulk_s, "s", "<= 1.1")] + [row("jobs", f"p99 latency: {name} vs GET /healthz", r["p99_ms"], results[
                    "GET /healthz (reference)"]["p99_ms"], "ms") for name, r in list(results.items())[1:]]
    write_record("jobs", {**vars(args), "bulk_s": bulk_s, "job_s": job_s, "floods": results, "generator_requests":
                          after - before}, rows, about="the `make demo` model on one local Ray: a set job against "
                 "`emoji-ldm bulk`; floods of 200 concurrent refused requests against GET /healthz.")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
