"""Helpers for the serving tests: deploy the app on the session's Ray, talk HTTP to it."""

from __future__ import annotations

import json
import time

import urllib3

from tests.conftest import free_port

HTTP = urllib3.PoolManager(maxsize=64, retries=False, timeout=urllib3.Timeout(connect=5, read=300))


def deploy(model: str, *, sets_uri: str = "", generator: dict | None = None, ingress: dict | None = None,
           max_batch_size: int = 16, batch_wait_timeout_s: float = 0.05, same_serve: bool = False,
           name: str = "emoji", route_prefix: str = "/", **app_args) -> str | None:
    """Start Serve on a free loopback port and run the app with these deployment options; returns the URL.
    A Serve still running on the session's cluster is shut down first: it would keep its own port.
    `same_serve`: run the app on the Serve already running (after `serve.delete`: a restart of the app, or a
    second app under its own `name` and `route_prefix`)."""
    from ray import serve

    from emoji_ldm.serve.app import application

    port = None
    if not same_serve:
        serve.shutdown()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    # a replica stops at once when the test deletes the app (Serve waits up to 20 s for idle replicas by default)
    quick_stop = {"graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.1}
    deployments = [{"name": "Generator", "ray_actor_options": {"num_cpus": 0.5}, **quick_stop, **(generator or {})},
                   {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}, **quick_stop, **(ingress or {})}]
    args = {"model": model, "sets_uri": sets_uri, "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": batch_wait_timeout_s, **app_args}
    serve.run(application(args, deployments), name=name, route_prefix=route_prefix)
    return f"http://127.0.0.1:{port}" if port else None


def stop_runners() -> None:
    """Kill the durable jobs' runner actors a module left (they are detached: they outlive Serve)."""
    import ray

    from emoji_ldm.serve.placement import NAMESPACE

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE:
            ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE))


def post(url: str, body, headers: dict | None = None) -> urllib3.BaseHTTPResponse:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return HTTP.request("POST", url, body=data, headers={"content-type": "application/json", **(headers or {})})


def get(url: str, headers: dict | None = None) -> urllib3.BaseHTTPResponse:
    return HTTP.request("GET", url, headers=headers)


def replica_counts(app: str = "emoji", deployment: str = "Generator") -> dict:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def assert_same_image(a: bytes, b: bytes) -> None:
    """Batching never changes an image: byte for byte on CPU. On CUDA, where bf16 kernels are not
    batch-invariant, the decoded pixels within a small tolerance instead."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    if not torch.cuda.is_available():
        assert a == b
        return
    x, y = (np.asarray(Image.open(io.BytesIO(d)).convert("RGBA"), dtype=np.int16) for d in (a, b))
    assert x.shape == y.shape and np.abs(x - y).mean() <= 2 and np.abs(x - y).max() <= 48
