"""The one training loop (train/loop.py) where only some recipes had a piece of it, and at Ray Train's defaults:
the VAE's checkpoints and --resume, and a run with a worker restart at Ray Train's own health-check interval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.train import vae
from emoji_ldm.train.checkpoint import latest
from emoji_ldm.train.vae import VAETrainConfig, train_vae
from tests.conftest import FAST, REPO
from tests.faults import rank1_fails


@pytest.fixture(scope="module")
def tiny(pipeline, ray_local):
    """The session's pipeline: its dataset (48 rows) and latent table; read only."""
    return pipeline


def test_vae_checkpoints_and_resumes_on_s3(s3_server, tiny):
    """train-vae in the loop, into S3: rank 1 dies at step 3, after the step-2 checkpoint; a new run into that
    --out is refused, --resume with another world size too, and --resume finishes the run from step 2: each step
    logged once, a VAE that diffusers loads, and no checkpoints left beside it."""
    from diffusers import AutoencoderKL
    from ray.train import WorkerGroupError

    from emoji_ldm.store.artifacts import local_copy

    client = s3_server.client()
    client.create_bucket(Bucket="loop-vae")
    out = "s3://loop-vae/vae"

    def config(**kwargs):
        return VAETrainConfig(dataset=tiny.ds, out=out, max_steps=4, checkpoint_every=2, log_every=1, **kwargs)

    def keys():
        return [o["Key"] for o in client.list_objects_v2(Bucket="loop-vae").get("Contents", [])]

    with rank1_fails(vae, at_step=3), pytest.raises(WorkerGroupError):
        train_vae(config(max_failures=0))
    found = latest(out)
    assert found and found[1]["step"] == 2 and found[1]["world_size"] == 2 and found[1]["zero_stage"] == 0
    assert "vae/metrics.json" not in keys()  # no VAE yet
    with pytest.raises(UserError, match="already has checkpoints"):
        train_vae(config())
    with pytest.raises(UserError, match="other world_size"):
        train_vae(config(resume=True, workers=1))

    card = train_vae(config(resume=True))
    assert card["metrics"]["steps"] == 4 and card["metrics"]["scaling_factor"] > 0
    rows = client.get_object(Bucket="loop-vae", Key="vae/metrics.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4] and all(json.loads(r)["rec_loss"] > 0 for r in rows)
    assert not [k for k in keys() if k.startswith("vae/checkpoints/")]
    loaded = AutoencoderKL.from_pretrained(local_copy(out))
    assert loaded.config.scaling_factor == pytest.approx(card["metrics"]["scaling_factor"])


# Run in a process of its own: it imports neither this suite's conftest (which sets the interval) nor `tests`
# beyond the fault helper, and starts a Ray of its own (the session's Ray was started with the suite's setting).
_AT_DEFAULTS = """
import json, os, sys
assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ and "RAY_ADDRESS" not in os.environ
from emoji_ldm.train import ldm
from emoji_ldm.train.speed import SpeedOptions
from tests.faults import rank1_fails
args = json.loads(sys.argv[1])
with rank1_fails(ldm, at_step=4, marker=args["marker"]):  # once: the restarted group goes on
    card = ldm.train(ldm.TrainConfig(data=args["data"], out=args["out"], max_steps=5, zero_stage=3,
                                     speed=SpeedOptions(gradient_checkpointing=True), overrides=args["overrides"]))
print("CARD " + json.dumps(card["training"]))
"""


@pytest.mark.timeout(600)
def test_zero3_with_a_killed_worker_recovers_at_ray_trains_default_health_check(tiny, tmp_path):
    """At Ray Train's default health-check interval (2 s; the suite sets 0.25 s, users do not), ZeRO-3 (parameters
    partitioned) with gradient checkpointing; rank 1 is killed at step 4, after the step-2 checkpoint: Ray Train
    restarts the group, which resumes from that checkpoint (ZeRO-3's partitioned state and the EMA) and
    finishes; the metrics have each step once."""
    out, marker = tmp_path / "run", tmp_path / "crashed"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_ADDRESS")}
    args = {"data": tiny.lat, "out": str(out), "marker": str(marker),
            "overrides": {**FAST, "train.checkpoint_every": 2}}
    r = subprocess.run([sys.executable, "-c", _AT_DEFAULTS, json.dumps(args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert marker.exists()  # rank 1 did die once
    assert "resumed from" in r.stdout and "at step 2" in r.stdout  # the restarted group's banner
    card = json.loads(r.stdout.split("CARD ", 1)[1].splitlines()[0])
    assert card == {"workers": 2, "zero_stage": 3, "steps": 5, "global_batch": 8}
    assert (out / "model" / "model_index.json").exists() and (out / "model" / "unet").exists()
    assert json.loads((out / "config.json").read_text())["run"]["speed"]["gradient_checkpointing"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
