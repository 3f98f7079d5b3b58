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
    python bench/security.py --before REV [--rounds 3] [--posts 6]

With `--before REV`: ours against the code of REV in the same run, the same Ray and the same Serve: REV's
`emoji_ldm` is unpacked from git as a package of its own (`emoji_ldm_before`, its meter actor and job namespace
renamed), and both apps are deployed side by side. Floods of 200 concurrent refused requests (401 no key; 429 over
the cost budget, decided by the meter actor) and job posts (each cancelled), alternating ours and before; the p99
of each, ours / before (goal <= 1.1).
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



def _start_serve() -> tuple[int, list[dict]]:
    """A local Ray and Serve on a free port; the deployments' settings both sides are served with."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port, [{"name": "Generator", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                  {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 512, "max_queued_requests": 1024,
                   "ray_actor_options": {"num_cpus": 0.25}}]

def post_and_cancel(base: str, headers: dict, namespace: str = "emoji-ldm-jobs") -> float:
    """Seconds of one POST /v1/jobs (a 1-item set); the job is then cancelled and its runner (in `namespace`)
    waited out, so the next post starts from the same state."""
    import ray

    body = json.dumps({"theme": "t", "items": ["a"], "steps": 2}).encode()
    seconds, answer = timed(HTTP.request, "POST", f"{base}/v1/jobs", body=body, headers={**JSON, **headers})
    assert answer.status == 202, answer.data
    job = json.loads(answer.data)["id"]
    HTTP.request("DELETE", f"{base}/v1/jobs/{job}", headers=headers)
    deadline = time.time() + 60
    while time.time() < deadline and any(a["name"].endswith(job) for a in ray.util.list_named_actors(True)
                                         if a["namespace"] == namespace):
        time.sleep(0.05)
    return seconds


def peer_package(rev: str, root: Path) -> str:
    """REV's emoji_ldm unpacked under `root` as `emoji_ldm_before` (its detached meter and job actors renamed, so
    they do not meet ours); returns the folder to put on PYTHONPATH."""
    import io
    import re
    import subprocess
    import tarfile

    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "emoji_ldm"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    (root / "emoji_ldm").rename(root / "emoji_ldm_before")
    for path in (root / "emoji_ldm_before").rglob("*.py"):
        text = re.sub(r"\bemoji_ldm\b", "emoji_ldm_before", path.read_text())
        text = text.replace('"emoji-ldm-meter"', '"emoji-ldm-meter-before"').replace(
            '"emoji-ldm-jobs"', '"emoji-ldm-jobs-before"')
        path.write_text(text)
    return str(root)


def _side(package: str, tmp: Path, model: str, name: str) -> tuple[dict, dict]:
    """(app args, bearer headers by key name) of one side, its key file written by its own code."""
    import dataclasses
    import importlib

    keys_mod = importlib.import_module(f"{package}.serve.keys")
    keys = str(tmp / f"keys-{name}.json")
    made = {}
    for key, flags in (("open", {"rate": 100_000, "max_jobs": 1000}), ("thrifty", {"rate": 100_000})):
        made[key] = keys_mod.create_command(keys_mod.KeysCreateConfig(file=keys, name=key, **flags)).splitlines()[2]
    ring = keys_mod.read_keys(keys)
    ring["thrifty"] = dataclasses.replace(ring["thrifty"], cost_per_minute=100)
    keys_mod.write_keys(keys, ring)
    args = {"model": model, "max_batch_size": 4, "job_num_cpus": 0.25, "sweep_s": 600, "keys": keys,
            "jobs_uri": str(tmp / f"jobs-{name}")}
    return args, {key: {"authorization": f"Bearer {k}"} for key, k in made.items()}


def compare_main(args) -> None:
    """Ours against `args.before`'s code, side by side in one Serve (the module docstring)."""
    import importlib
    import os

    import ray
    from ray import serve

    from tests.tiny_models import tiny_model_with_card

    started, deadline = time.time(), time.time() + args.budget_s
    tmp = Path(tempfile.mkdtemp(prefix="bench-security-"))
    peer = peer_package(args.before, tmp / "peer")
    sys.path.insert(0, peer)
    os.environ["PYTHONPATH"] = os.pathsep.join([peer, str(REPO), os.environ.get("PYTHONPATH", "")])
    model = str(tiny_model_with_card(tmp / "model"))
    port, deployments = _start_serve()
    auth, url = {}, {}
    for name, package in (("ours", "emoji_ldm"), ("before", "emoji_ldm_before")):
        app_args, auth[name] = _side(package, tmp, model, name)
        app = importlib.import_module(f"{package}.serve.app")
        serve.run(app.application(app_args, deployments), name=name, route_prefix=f"/{name}")
        url[name] = f"http://127.0.0.1:{port}/{name}"
    print(f"serving ours and {args.before} on port {port}; setup {time.time() - started:.0f} s", flush=True)
    figures = _compare_runs(args, url, auth, deadline)
    _compare_record(args, figures, time.time() - started)
    serve.shutdown()
    ray.shutdown()


def _compare_runs(args, url: dict, auth: dict, deadline: float) -> dict:
    """The floods and the job posts, alternating the two sides; their p99s and the posts' latencies."""
    gen = json.dumps({"prompt": "cat", "n": 16, "steps": 100}).encode()
    fits = json.dumps({"prompt": "cat", "n": 1, "steps": 60}).encode()
    for side in url:  # thrifty spends 60 of its 100 units: each 60-unit request after it is the meter's refusal
        assert HTTP.request("POST", f"{url[side]}/v1/generate", body=fits,
                            headers={**JSON, **auth[side]["thrifty"]}).status == 200
        flood(HTTP, "GET", f"{url[side]}/healthz", {}, None, 1, args.concurrency, deadline)  # warm-up
        post_and_cancel(url[side], auth[side]["open"], namespace=NAMESPACES[side])
    kinds = {"401 no key": lambda side: ("POST", f"{url[side]}/v1/generate", JSON, gen),
             "429 over the cost budget": lambda side: ("POST", f"{url[side]}/v1/generate",
                                                       {**JSON, **auth[side]["thrifty"]}, fits)}
    floods = {kind: {side: [] for side in url} for kind in kinds}
    for i in range(args.rounds):  # one flood round a side at a time, the order swapped every round
        for side in (list(url)[::-1] if i % 2 else list(url)):
            for kind, spec in kinds.items():
                if kind.startswith("429"):  # drain what refilled since: the flood is all the meter's refusals
                    _drain(url[side], auth[side]["thrifty"], fits)
                r = flood(HTTP, *spec(side), 1, args.concurrency, deadline)
                # a refill during the flood may let one or two through: the p99 of 200 is the 198th, unmoved
                assert r["codes"].get(int(kind[:3]), 0) >= r["n"] - 2, (kind, side, r["codes"])
                floods[kind][side].append(r["p99_ms"])
    posts = repeat({side: (lambda i, side=side: 1000 * post_and_cancel(url[side], auth[side]["open"],
                                                                       namespace=NAMESPACES[side])
                           if time.time() < deadline else None) for side in url},
                   args.posts, alternate=True,
                   report=lambda i, side, ms: print(f"post {i} {side}: {ms:.0f} ms" if ms else
                                                    f"post {i} {side}: skipped (time budget)", flush=True))
    for kind, by_side in floods.items():
        print(f"{kind:26s} p99 ours {by_side['ours']} ms, before {by_side['before']} ms", flush=True)
    return {"floods_p99_ms": floods, "posts_ms": posts}


def _drain(base: str, headers: dict, body: bytes) -> None:
    """Spend what a key's cost bucket refilled, until the meter refuses."""
    for _ in range(5):
        if HTTP.request("POST", f"{base}/v1/generate", body=body, headers={**JSON, **headers}).status == 429:
            return


def _compare_record(args, figures: dict, wall_s: float) -> None:
    floods, posts = figures["floods_p99_ms"], figures["posts_ms"]
    rows = [row("security", f"p99 of {args.concurrency} concurrent {kind}: ours vs {args.before}",
                by_side["ours"], by_side["before"], "ms", goal="<= 1.1") for kind, by_side in floods.items()]
    ours, before = [p for p in posts["ours"] if p], [p for p in posts["before"] if p]
    n = min(len(ours), len(before))
    rows.append(row("security", f"POST /v1/jobs (charged at admission, stored bytes measured) p99: ours vs "
                                f"{args.before}", _p99(ours[:n]), _p99(before[:n]), "ms", goal="<= 1.1"))
    rows.append(row("security", f"POST /v1/jobs median: ours vs {args.before}", ours[:n], before[:n], "ms"))
    write_record("security", {**vars(args), **figures, "wall_s": wall_s}, rows, peer=f"emoji_ldm at {args.before}",
                 about="ours and the code of --before side by side on one local Ray and one Serve (the tests' tiny "
                       "model), alternating: floods of 200 concurrent refused requests (p99 per round) and job "
                       "posts, each cancelled.")


def _p99(values: list[float]) -> float | None:
    values = sorted(values)
    return values[int(0.99 * (len(values) - 1))] if values else None


NAMESPACES = {"ours": "emoji-ldm-jobs", "before": "emoji-ldm-jobs-before"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 200 concurrent requests per flood")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--posts", type=int, default=6, help="job posts per side (guarded, unguarded)")
    parser.add_argument("--budget-s", type=float, default=150, help="stop starting new work after this long")
    parser.add_argument("--before", default="", help="a git revision: ours against its code, side by side")
    args = parser.parse_args()
    if args.before:
        return compare_main(args)
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

    port, deployments = _start_serve()
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
