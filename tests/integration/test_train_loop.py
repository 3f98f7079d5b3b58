"""The one training loop (train/loop.py) where only some recipes had a piece of it, and at Ray Train's defaults:
the VAE's checkpoints and --resume, and a run with a worker restart at Ray Train's own health-check interval."""

from __future__ import annotations

import json

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.train import ldm, vae
from emoji_ldm.train.checkpoint import latest
from emoji_ldm.train.speed import SpeedOptions
from emoji_ldm.train.vae import VAETrainConfig, train_vae
from tests.conftest import FAST
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


# Ray Train's default health-check interval (DEFAULT_HEALTH_CHECK_INTERVAL_S in ray/train/v2/_internal/constants.py);
# the suite runs at 0.25 s (conftest.py), users at this.
RAY_TRAIN_DEFAULT_HEALTH_CHECK_S = "2.0"


@pytest.mark.timeout(600)
def test_zero3_with_a_killed_worker_recovers_at_ray_trains_default_health_check(tiny, tmp_path, monkeypatch):
    """At Ray Train's default health-check interval (2 s; the suite sets 0.25 s, users do not), ZeRO-3 (parameters
    partitioned) with gradient checkpointing; rank 1 is killed at step 3, after the step-2 checkpoint: Ray Train
    restarts the group, which resumes from that checkpoint (ZeRO-3's partitioned state and the EMA) and
    finishes; the metrics have each step once (4 steps: a ZeRO-3 step with checkpointing costs seconds of gloo
    collectives on CPU; the restarted group still goes on past the failed step). Ray Train hands the driver's
    value of the variable to its controller (ray/train/v2/_internal/constants.py, ENV_VARS_TO_PROPAGATE), so this
    driver's setting is the run's."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", RAY_TRAIN_DEFAULT_HEALTH_CHECK_S)
    out, marker = tmp_path / "run", tmp_path / "crashed"
    with rank1_fails(ldm, at_step=3, marker=marker):  # once: the restarted group goes on
        card = ldm.train(ldm.TrainConfig(data=tiny.lat, out=str(out), max_steps=4, zero_stage=3,
                                         speed=SpeedOptions(gradient_checkpointing=True),
                                         overrides={**FAST, "train.checkpoint_every": 2}))
    assert marker.exists()  # rank 1 did die once
    assert card["training"] == {"workers": 2, "zero_stage": 3, "steps": 4, "global_batch": 8}
    assert (out / "model" / "model_index.json").exists() and (out / "model" / "unet").exists()
    assert json.loads((out / "config.json").read_text())["run"]["speed"]["gradient_checkpointing"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # resumed from the step-2 checkpoint: steps 1-2 are the first attempt's lines, 3-4 the restarted group's
    died = marker.stat().st_mtime
    assert [r["time"] < died for r in rows] == [True, True, False, False]
