"""The training harness (train/runner.py, checkpoint.py, ema.py, metrics.py) on what a GPU cluster hits first,
reproduced on CPU: DeepSpeed bf16, one rank failing alone, checkpoints and resume on S3."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from emoji_ldm.errors import UserError
from emoji_ldm.train.ldm import latest_checkpoint
from tests.conftest import FAST, run_cli, train_fast


@pytest.fixture(scope="module")
def tiny(pipeline, ray_local):
    """The session's pipeline: its latent table (48 Twemoji and synthetic rows, tiny preset) and its 4-step run;
    read only."""
    return pipeline


@pytest.fixture
def one_rank_gloo():
    """A one-process gloo group, as a Ray Train worker has, for DeepSpeed outside Ray."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_ema_under_deepspeed_bf16_moves_like_fp32(one_rank_gloo):
    """DeepSpeed bf16 (bf16 module, fp32 masters): with decay 0.9999 an EMA of the bf16 weights cannot move
    (1e-4 x (s - p) is below bf16's resolution). The harness's EMA is fp32, fed from the masters, and moves
    by what an fp32 reference computes from the same masters."""
    import deepspeed

    from emoji_ldm.models.builders import build_unet, configure_trainable
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.ema import make_ema, master_weights
    from emoji_ldm.train.runner import deepspeed_config

    preset = get_preset("tiny", {"unet.block_out_channels": "32,32", "train.ema_decay": 0.9999})
    torch.manual_seed(0)
    unet = build_unet(preset)
    params = configure_trainable(unet, preset)
    engine, *_ = deepspeed.initialize(model=unet, optimizer=torch.optim.AdamW(params, lr=1e-2),
                                      config=deepspeed_config(2, 1, 1.0, 2, "bf16"),
                                      dist_init_required=False)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    ema = make_ema(master_weights(params), preset.train)
    ema.optimization_step = 10**6  # the decay at its ceiling, 0.9999, from the first update
    reference = [s.double().clone() for s in ema.shadow_params]
    start = [s.clone() for s in ema.shadow_params]
    text = torch.randn(2, 8, unet.config.cross_attention_dim)
    for _ in range(5):
        out = engine(torch.randn(2, 4, 8, 8).bfloat16(), torch.tensor([10, 500]),
                     encoder_hidden_states=text.bfloat16()).sample
        engine.backward(out.float().pow(2).mean())
        engine.step()
        masters = list(master_weights(params))
        ema.step(masters)
        for r, m in zip(reference, masters):
            r.mul_(0.9999).add_(m.double(), alpha=1e-4)
    assert all(s.dtype == torch.float32 for s in ema.shadow_params)
    moved = sum(float((s - s0).abs().sum()) for s, s0 in zip(ema.shadow_params, start))
    expected = sum(float((r - s0.double()).abs().sum()) for r, s0 in zip(reference, start))
    assert expected > 0 and moved == pytest.approx(expected, rel=1e-3)
    assert all(torch.allclose(s.double(), r, atol=1e-6) for s, r in zip(ema.shadow_params, reference))


def test_bf16_run_keeps_an_fp32_ema_and_exports_it(tiny, tmp_path):
    """`train --precision bf16` on 2 workers with the other fast-path flags (channels-last, gradient
    checkpointing): the banner and config.json say so, the losses are numbers, the checkpoint's EMA is fp32
    and the exported UNet is exactly that EMA."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]
    r = run_cli("train", "--data", tiny.lat, "--out", str(out), "--max-steps", "3", "--precision", "bf16",
                "--channels-last", "--gradient-checkpointing", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "precision bf16, gradient_checkpointing, channels_last, attention: scaled_dot_product_attention" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)  # not NaN
    saved = json.loads((out / "config.json").read_text())["run"]["speed"]
    assert saved["precision"] == "bf16" and saved["channels_last"] and saved["gradient_checkpointing"]

    folder, _ = latest_checkpoint(str(out))
    shadow = torch.load(f"{folder}/ema.pt", weights_only=False)["shadow_params"]
    assert {s.dtype for s in shadow} == {torch.float32}
    unet = UNet2DConditionModel.from_pretrained(str(out / "model" / "unet"))
    exported = list(unet.parameters())
    assert len(exported) == len(shadow)
    assert all(torch.equal(p.data, s) for p, s in zip(exported, shadow))


@pytest.mark.timeout(600)
def test_user_error_on_one_rank_stops_every_rank(tiny, tmp_path):
    """A UserError on rank 1 alone (rank 0 goes on into the next collective): the run stops with that one
    line, without waiting for the collective's timeout, and Ray's restarts do not retry it."""
    with pytest.raises(UserError, match="fault injection: a user error on rank 1 at step 2"):
        train_fast(tiny.lat, tmp_path / "run", max_steps=6, user_error_at_step=2, max_failures=2)


def test_crash_then_resume_from_s3_continues_exactly(s3_server, tiny, tmp_path):
    """The session pipeline's run (4 steps straight, local) == the same 4 steps on moto S3 whose rank 1 dies at
    step 4, after its step-3 checkpoint, then `--resume` from s3:// (weights, optimizer, EMA, RNG, data position,
    step, metrics); a resume that does not match is refused. (The pipeline's run also drew sample grids at steps 2
    and 4: they must not shift the training RNG.)"""
    from ray.train import WorkerGroupError

    client = s3_server.client()
    client.create_bucket(Bucket="harness-runs")
    out = "s3://harness-runs/runs/crash"
    assert tiny.card["training"] == {"workers": 2, "zero_stage": 2, "steps": 4, "global_batch": 8}
    with pytest.raises(WorkerGroupError, match="Training failed due to worker errors") as died:
        train_fast(tiny.lat, out, max_steps=4, crash_at_step=4, max_failures=0)
    assert 1 in died.value.worker_failures  # rank 1 died (rank 0 then fails in a collective with it)
    found = latest_checkpoint(out)
    assert found and found[0].startswith("s3://") and found[1]["step"] == 3
    with pytest.raises(UserError, match="already has checkpoints"):
        train_fast(tiny.lat, out, max_steps=4)
    with pytest.raises(UserError, match="different unet config"):
        train_fast(tiny.lat, out, max_steps=4, resume=True, overrides={"unet.block_out_channels": "32,32"})
    with pytest.raises(UserError, match="written by 2 workers"):
        train_fast(tiny.lat, out, max_steps=4, resume=True, workers=1)
    card = train_fast(tiny.lat, out, max_steps=4, resume=True)
    assert card["training"]["steps"] == 4
    metrics = client.get_object(Bucket="harness-runs", Key="runs/crash/metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2, 3, 4]

    (folder_a, meta_a), (folder_b, meta_b) = latest_checkpoint(str(tiny.run)), latest_checkpoint(out)
    assert meta_a["step"] == meta_b["step"] == 4
    local_b = tmp_path / "b"
    prefix = folder_b.removeprefix("s3://harness-runs/")
    for name in ("ema.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (local_b / name).parent.mkdir(parents=True, exist_ok=True)
        client.download_file("harness-runs", f"{prefix}/{name}", str(local_b / name))
    ema_a = torch.load(f"{folder_a}/ema.pt", weights_only=False)["shadow_params"]
    ema_b = torch.load(local_b / "ema.pt", weights_only=False)["shadow_params"]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ema_a, ema_b))
    opt_a = torch.load(f"{folder_a}/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    opt_b = torch.load(local_b / "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    flat_a = opt_a["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    flat_b = opt_b["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    assert torch.allclose(flat_a, flat_b, atol=1e-6)
