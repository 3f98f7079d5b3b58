"""Build, caption, encode and train on a two-node Ray cluster on this machine, with moto S3 as the shared storage.

`ray start --head` and a second `ray start --address` node, each with 1 CPU
(so the two training workers must go one to a node) and its own temp dir;
the stages run as a Ray Job's driver would: the CLI with RAY_ADDRESS set.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tests.conftest import VENV_BIN, free_port, run_cli

BUCKET = "two-node"


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """(RAY_ADDRESS, env) of a head + one worker node, both started with the S3 settings their workers use."""
    # short temp dirs: Ray's Unix socket paths under them must stay within 107 characters
    head_tmp, node_tmp = tempfile.mkdtemp(prefix="ray2h-", dir="/tmp"), tempfile.mkdtemp(prefix="ray2w-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray = str(VENV_BIN / "ray")
    start = [ray, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    # each node in a session of its own, stopped by ending its process group: `ray stop` would stop every Ray
    # on the machine, other tests' and other users' too
    nodes = [_node([*start, "--head", "--port", str(port), "--include-dashboard", "true", "--dashboard-host",
                    "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir", head_tmp,
                    "--object-store-memory", "300000000"], env)]
    try:
        _wait_for(ray, f"127.0.0.1:{port}", nodes[0], env, nodes=1)
        nodes.append(_node([*start, "--address", f"127.0.0.1:{port}", "--object-store-memory", "300000000",
                            "--temp-dir", node_tmp, "--resources", '{"second_node": 1}'], env))
        _wait_for(ray, f"127.0.0.1:{port}", nodes[1], env, nodes=2)
        s3_server.client().create_bucket(Bucket=BUCKET)
        yield f"127.0.0.1:{port}", {**s3_server.env(), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        for node in reversed(nodes):  # both stop at once: each takes ~15 s to stop its processes
            _signal(node, signal.SIGTERM)
        for node in reversed(nodes):
            _stop(node)
        for folder in (head_tmp, node_tmp):
            shutil.rmtree(folder, ignore_errors=True)


def _node(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(ray: str, address: str, node: subprocess.Popen, env: dict, nodes: int) -> None:
    """Until `ray status` at `address` shows `nodes` alive nodes (at most 3 minutes)."""
    deadline = time.time() + 180
    while time.time() < deadline:
        assert node.poll() is None, f"ray start exited {node.returncode}: {node.stderr.read()[-3000:]}"
        status = subprocess.run([ray, "status", "--address", address], env=env, capture_output=True, text=True)
        if status.returncode == 0 and status.stdout.count("node_") >= nodes:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster at {address} did not reach {nodes} node(s) in 180 s")


def _signal(node: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(node.pid, sig)  # on SIGTERM the node's `ray start --block` stops what it started
    except ProcessLookupError:
        pass


def _stop(node: subprocess.Popen) -> None:
    """Wait for a node signalled with SIGTERM; SIGKILL its group after a minute."""
    try:
        node.wait(60)
    except subprocess.TimeoutExpired:
        _signal(node, signal.SIGKILL)
        node.wait(10)


def test_encode_and_train_on_two_nodes(two_nodes, tmp_path):
    import ray
    from ray.util.state import list_actors

    address, env = two_nodes
    data, vae, latents, run = (f"s3://{BUCKET}/{name}" for name in ("ds", "vae", "latents", "run"))
    for args in (("dataset", "build", "--source", "twemoji", "--limit", "40", "--out", data),
                 ("dataset", "build", "--source", "synthetic:16", "--out", data),
                 ("dataset", "caption", data),
                 ("train-vae", "--dataset", data, "--out", vae, "--max-steps", "2"),
                 ("encode", "--dataset", data, "--vae", vae, "--out", latents),
                 ("train", "--data", latents, "--out", run, "--workers", "2", "--max-steps", "3",
                  "--set", "train.batch_size=8", "--set", "unet.block_out_channels=32,64",
                  "--set", "train.sample_every=0", "--set", "train.checkpoint_every=3")):
        r = run_cli(*args, env=env, timeout=600)
        assert r.returncode == 0, f"{args[0]}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "train: 3 steps" in r.stdout

    ray.init(address=address, log_to_driver=False)
    try:
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=100,
                              raise_on_missing_output=False)
        assert len(nodes) == 2
        assert {a.node_id for a in workers} == nodes  # the training workers ran on both nodes
    finally:
        ray.shutdown()

    # a local path that the other node cannot reach is refused before anything starts
    r = run_cli("train", "--data", latents, "--out", str(tmp_path / "local-run"), "--workers", "2",
                "--max-steps", "1", "--set", "train.batch_size=8", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"emoji-ldm: error: the run folder (--out) is the local path {str(tmp_path / 'local-run')!r}, but this "
        "Ray cluster has 2 nodes and workers on the others cannot reach it: use an s3:// URI, or list a "
        "filesystem every node mounts in $EMOJI_LDM_SHARED_PATHS"]
