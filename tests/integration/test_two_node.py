"""Encode and train on a two-node Ray cluster on this machine, with moto S3 as the shared storage.

`ray start --head` and a second `ray start --address` node, each with 1 CPU
(so the two training workers must go one to a node) and its own temp dir
(RAY_TMPDIR, see `two_nodes`);
the stages run as a Ray Job's driver would: the CLI with RAY_ADDRESS set.
The dataset (two builds and a caption pass) and the VAE are the session's
pipeline's, copied to S3: building them again on two nodes would repeat it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import run_cli, start_ray_node_up, stop_ray_nodes
from tests.fixtures.ray_nodes import own_head

BUCKET = "two-node"


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """(the dashboard's URL, env) of a head + one worker node, both started with the S3 settings their workers use,
    each with a temp dir of its own (see `own_head`)."""
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with own_head(env, num_cpus=1, prefix="ray2h-", dashboard=True) as (address, _, dashboard):
        node_tmp = tempfile.mkdtemp(prefix="ray2w-", dir="/tmp")
        node = None
        try:
            node = start_ray_node_up(["--num-cpus", "1", "--address", address, "--object-store-memory", "300000000",
                                      "--resources", '{"second_node": 1}'], {**env, "RAY_TMPDIR": node_tmp}, address,
                                     nodes=2, log=Path(node_tmp) / "start.log")
            s3_server.client().create_bucket(Bucket=BUCKET)
            yield dashboard, {**s3_server.env(), "RAY_ADDRESS": address}
        finally:
            if node is not None:
                stop_ray_nodes([node])
            shutil.rmtree(node_tmp, ignore_errors=True)


def _upload(client, folder: str, bucket: str, prefix: str) -> str:
    """A local table or model folder, copied under s3://BUCKET/PREFIX (Delta logs hold relative paths)."""
    root = Path(folder)
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root)}")
    return f"s3://{bucket}/{prefix}"


def test_encode_and_train_on_two_nodes(two_nodes, pipeline, s3_server, tmp_path, monkeypatch):
    from ray.util.state import list_actors, list_nodes

    dashboard, env = two_nodes  # the State API's address
    data = _upload(s3_server.client(), pipeline.ds, BUCKET, "ds")
    vae = _upload(s3_server.client(), pipeline.vae, BUCKET, "vae")
    latents, run = f"s3://{BUCKET}/latents", f"s3://{BUCKET}/run"
    for args in (("encode", "--dataset", data, "--vae", vae, "--out", latents),
                 ("train", "--data", latents, "--out", run, "--workers", "2", "--max-steps", "3",
                  "--set", "train.batch_size=8", "--set", "unet.block_out_channels=32,64",
                  "--set", "train.sample_every=0", "--set", "train.checkpoint_every=3")):
        r = run_cli(*args, env=env, timeout=600)
        assert r.returncode == 0, f"{args[0]}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        # Ray Train's placement-group cleaner watched this cluster's controller, not the session's head (where it
        # finds no such actor, takes the controller for dead, and quits or removes the live placement group)
        for sign in ("Failed to register placement group with cleaner", "Detected that the Ray Train controller"):
            assert sign not in r.stdout + r.stderr, r.stderr[-3000:]
    assert "train: 3 steps" in r.stdout

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # Ray's State API would take it over `address`
    nodes = {n.node_id for n in list_nodes(address=dashboard) if n.state == "ALIVE"}
    workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=100,
                          raise_on_missing_output=False)
    assert len(nodes) == 2
    assert {a.node_id for a in workers} == nodes  # the training workers ran on both nodes

    # a local path that the other node cannot reach is refused before anything starts
    r = run_cli("train", "--data", latents, "--out", str(tmp_path / "local-run"), "--workers", "2",
                "--max-steps", "1", "--set", "train.batch_size=8", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"emoji-ldm: error: the run folder (--out) is the local path {str(tmp_path / 'local-run')!r}, but this "
        "Ray cluster has 2 nodes and workers on the others cannot reach it: use an s3:// URI, or list a "
        "filesystem every node mounts in $EMOJI_LDM_SHARED_PATHS"]
