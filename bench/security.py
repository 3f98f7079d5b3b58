"""Security benchmark (issue 46): what refusing costs, and what the atomic job quota costs, on one local Ray.

1. Floods of 200 concurrent requests (`--rounds` rounds each) against a keyed server on 127.0.0.1: refused
   with 401 (no key), 429 over the key's cost budget (images x steps; a request that fits a minute's budget
   but not what is left of it, so the shared meter actor decides each one),
   429 over the key's request rate, and 400 for a callback to an internal address (POST /v1/jobs); p50/p99
   latency of each against the same flood to GET /healthz (open, no model work) in the same run.
2. The atomic quota check per job post: POST /v1/jobs (each job cancelled at once) to a keyed app, where the
   one meter actor admits each job, against the same post to an app without keys, where no quota is checked
   (the unguarded post); alternating, the same Serve, the same tiny model. Also the admit call alone.

The model is the tests' tiny one (made here), so the figures are the service's own overhead, not a model's.

    python bench/security.py [--rounds 3] [--posts 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import urllib3
from common import REPO, flood, free_port, repeat, row, timed, write_record

sys.path.insert(0, str(REPO))
HTTP = urllib3.PoolManager(maxsize=256, retries=False, timeout=urllib3.Timeout(connect=10, read=120))
JSON = {"content-type": "application/json"}


def post_and_cancel(base: str, headers: dict) -> float:
    """Seconds of one POST /v1/jobs (a 1-item set); the job is then cancelled and its runner waited out, so
    the next post starts from the same state."""
    import ray

    from emoji_ldm.serve.durable import NAMESPACE

    body = json.dumps({"theme": "t", "items": ["a"], "steps": 2}).encode()
    seconds, answer = timed(HTTP.request, "POST", f"{base}/v1/jobs", body=body, headers={**JSON, **headers})
    assert answer.status == 202, answer.data
    job = json.loads(answer.data)["id"]
    HTTP.request("DELETE", f"{base}/v1/jobs/{job}", headers=headers)
    deadline = time.time() + 60
    while time.time() < deadline and any(a["name"].endswith(job) for a in ray.util.list_named_actors(True)
                                         if a["namespace"] == NAMESPACE):
        time.sleep(0.05)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 200 concurrent requests per flood")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--posts", type=int, default=6, help="job posts per side (guarded, unguarded)")
    parser.add_argument("--budget-s", type=float, default=150, help="stop starting new work after this long")
    args = parser.parse_args()
    started = time.time()
    deadline = started + args.budget_s

    import ray
    from ray import serve

    from emoji_ldm.serve.app import application
    from emoji_ldm.serve.keys import KeysCreateConfig, create_command, read_keys, write_keys
    from emoji_ldm.serve.meter import meter_actor
    from tests.tiny_models import tiny_model_with_card

    tmp = Path(tempfile.mkdtemp(prefix="bench-security-"))
    model = str(tiny_model_with_card(tmp / "model"))
    keys = str(tmp / "keys.json")
    made = {}
    for name, flags in (("open", {"rate": 100_000, "max_jobs": 1000}), ("rated", {"rate": 1}),
                        ("thrifty", {"rate": 100_000})):
        made[name] = create_command(KeysCreateConfig(file=keys, name=name, **flags)).splitlines()[2]
    ring = read_keys(keys)
    import dataclasses

    ring["thrifty"] = dataclasses.replace(ring["thrifty"], cost_per_minute=100)
    write_keys(keys, ring)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployments = [{"name": "Generator", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                   {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 512, "max_queued_requests": 1024,
                    "ray_actor_options": {"num_cpus": 0.25}}]
    base = {"model": model, "max_batch_size": 4, "job_num_cpus": 0.25, "sweep_s": 600}
    serve.run(application({**base, "keys": keys, "jobs_uri": str(tmp / "jobs-keyed")}, deployments),
              name="keyed", route_prefix="/keyed")
    serve.run(application({**base, "insecure": True, "jobs_uri": str(tmp / "jobs-open")}, deployments),
              name="open", route_prefix="/open")
    url = f"http://127.0.0.1:{port}"
    keyed, unkeyed = f"{url}/keyed", f"{url}/open"
    print(f"serving on {url}; setup {time.time() - started:.0f} s", flush=True)

    gen = json.dumps({"prompt": "cat", "n": 16, "steps": 100}).encode()
    refused_cb = json.dumps({"theme": "t", "items": ["a"], "steps": 2,
                             "callback_url": "http://10.1.2.3/hook"}).encode()
    auth = {name: {"authorization": f"Bearer {key}"} for name, key in made.items()}
    HTTP.request("POST", f"{keyed}/v1/generate", body=b"{}", headers={**JSON, **auth["rated"]})  # its 1 token
    # thrifty spends 60 of its 100 units a minute; each 60-unit request after it is refused by the meter actor
    # (a request over the whole budget would be refused in the ingress without asking it)
    fits = json.dumps({"prompt": "cat", "n": 1, "steps": 60}).encode()
    assert HTTP.request("POST", f"{keyed}/v1/generate", body=fits, headers={**JSON, **auth["thrifty"]}).status == 200
    # warm-up: the client's connections, not measured
    flood(HTTP, "GET", f"{keyed}/healthz", {}, None, 1, args.concurrency, deadline)
    floods = {
        "GET /healthz (reference)": ("GET", f"{keyed}/healthz", {}, None),
        "401 no key": ("POST", f"{keyed}/v1/generate", JSON, gen),
        "429 over the cost budget": ("POST", f"{keyed}/v1/generate", {**JSON, **auth["thrifty"]}, fits),
        "429 over the request rate": ("POST", f"{keyed}/v1/generate", {**JSON, **auth["rated"]}, gen),
        "400 refused callback": ("POST", f"{keyed}/v1/jobs", {**JSON, **auth["open"]}, refused_cb),
    }
    results = {name: flood(HTTP, *spec, args.rounds, args.concurrency, deadline) for name, spec in floods.items()}
    for name, r in results.items():
        print(f"{name:28s} n={r['n']} codes={r['codes']} p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms",
              flush=True)
    expected = {"GET /healthz (reference)": 200, "401 no key": 401, "429 over the cost budget": 429,
                "429 over the request rate": 429, "400 refused callback": 400}
    for name, code in expected.items():
        assert set(results[name]["codes"]) == {code}, (name, results[name]["codes"])

    # the quota check per job post: guarded (the meter actor admits) against unguarded (no keys, no quota)
    post_and_cancel(keyed, auth["open"])  # warm-up: the runners' worker processes
    post_and_cancel(unkeyed, {})
    posts = repeat({"guarded": lambda i: post_and_cancel(keyed, auth["open"]) if time.time() < deadline else None,
                    "unguarded": lambda i: post_and_cancel(unkeyed, {}) if time.time() < deadline else None},
                   args.posts, alternate=True,
                   report=lambda i, name, s: print(f"post {i} {name}: {s * 1000:.0f} ms" if s else
                                                   f"post {i} {name}: skipped (time budget)", flush=True))
    meter = meter_actor()
    admit_ms = []
    for i in range(200):
        t0 = time.perf_counter()
        ray.get(meter.admit.remote("key-bench", f"job-{i}", None))
        admit_ms.append(1000 * (time.perf_counter() - t0))
    print(f"admit call alone: median {statistics.median(admit_ms):.2f} ms, p99 "
          f"{sorted(admit_ms)[int(0.99 * 199)]:.2f} ms", flush=True)

    ref = results["GET /healthz (reference)"]["p99_ms"]
    rows = [row("security", f"p99 latency, {args.concurrency} concurrent: {name} vs GET /healthz",
                r["p99_ms"], ref, "ms") for name, r in list(results.items())[1:]]
    guarded = [s * 1000 for s in posts["guarded"] if s]
    unguarded = [s * 1000 for s in posts["unguarded"] if s]
    n = min(len(guarded), len(unguarded))
    rows.append(row("security", "POST /v1/jobs: with the atomic quota check (meter actor) vs unguarded (no keys)",
                    guarded[:n], unguarded[:n], "ms"))
    rows.append(row("security", "the meter's admit call alone (in-process round trip)", admit_ms, None, "ms"))
    write_record("security", {**vars(args), "floods": results, "posts_ms": {"guarded": guarded,
                                                                             "unguarded": unguarded},
                              "admit_ms": admit_ms, "wall_s": time.time() - started}, rows,
                 about="the tests' tiny model on one local Ray (4 logical CPUs on the machine's cores); floods of "
                       "200 concurrent refused requests against GET /healthz on 127.0.0.1, and job posts with the "
                       "atomic quota check against the same post to an app without keys.")
    serve.shutdown()
    ray.shutdown()
    print(f"done in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
