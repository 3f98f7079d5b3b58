"""The training harness (train/runner.py, checkpoint.py, ema.py, metrics.py) on what a GPU cluster hits first,
reproduced on CPU: DeepSpeed bf16, checkpoints and resume on S3 (one rank failing alone with a UserError:
test_error_boundary)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from emoji_ldm.errors import UserError
from emoji_ldm.train import ldm
from emoji_ldm.train.checkpoint import latest as latest_checkpoint
from tests.conftest import pipeline_speed, train_fast
from tests.faults import rank1_fails


@pytest.fixture(scope="module")
def tiny(pipeline, ray_local):
    """The session's pipeline: its latent table (48 Twemoji and synthetic rows, tiny preset) and its 4-step run;
    read only."""
    return pipeline


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


def _toy_recipe(out, engine, scheduler, params, forward, schedule, **kwargs):
    """A `loop.Recipe` of one rank on CPU around `engine`; its micro-batches are their own index (0, 1, ...)."""
    from itertools import count

    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train import loop
    from emoji_ldm.train.runner import Worker

    return loop.Recipe(tag="toy", out=str(out), worker=Worker(0, 1, torch.device("cpu"), "no", torch.float32),
                       engine=engine, scheduler=scheduler, zero_stage=0, params=params, micro=2,
                       batches=lambda counters: (i for i in count()), forward=forward, describe="a toy",
                       schedule=schedule, ema=get_preset("tiny").train, **kwargs)


@pytest.fixture
def no_ray_checkpoints(monkeypatch):
    """The loop's checkpoints without Ray Train: `save` records (step, meta) and flushes rank 0's log as the real
    one does, `restore` finds nothing."""
    from emoji_ldm.train import checkpoint

    saved = []

    def save(engine, counters, meta, log=None, **kwargs):
        saved.append((counters["step"], meta))
        log.flush()

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(checkpoint, "restore", lambda *args, **kwargs: None)
    return saved


def test_the_loop_accumulates_then_steps_logs_and_checkpoints(one_rank_gloo, no_ray_checkpoints, tmp_path):
    """`grad_accum` 2 on a DeepSpeed engine: each optimizer step takes two micro-batches (the engine updates on the
    second), then the EMA, the line (the mean loss of both), the grid and the checkpoint follow their schedule."""
    import deepspeed

    from emoji_ldm.train import loop
    from emoji_ldm.train.runner import deepspeed_config

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    engine, _, _, scheduler = deepspeed.initialize(
        model=layer, optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        config=deepspeed_config(2, 2, 1.0, 0, "no"), dist_init_required=False)
    seen, losses, grids = [], [], []

    def forward(i):
        seen.append(i)
        loss = engine(torch.full((2, 3), float(i))).pow(2).mean()
        losses.append(loss.item())
        return loss, {"double_loss": 2 * loss}

    recipe = _toy_recipe(tmp_path, engine, scheduler, list(layer.parameters()), forward,
                         loop.Schedule(max_steps=3, log_every=1, checkpoint_every=2, grad_accum=2, sample_every=2),
                         grid=lambda ema, step, log: grids.append(step), meta={"what": "toy"})
    state = loop.Loop(recipe)
    state.run()
    assert seen == list(range(6)) and (engine.global_steps, engine.micro_steps) == (3, 6)
    assert state.counters == {"step": 3} and state.ema.optimization_step == 3
    meta = {"world_size": 1, "zero_stage": 0, "device": "cpu", "precision": "no", "what": "toy"}
    assert no_ray_checkpoints == [(2, meta), (3, meta)]
    assert grids == [2, 3]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["images_per_s"] > 0 for r in rows)
    for row, pair in zip(rows, (losses[0:2], losses[2:4], losses[4:6])):
        assert row["loss"] == pytest.approx(sum(pair) / 2) and row["double_loss"] == pytest.approx(sum(pair))
        assert "skipped_steps" not in row


def test_a_skipped_step_is_counted_but_moves_nothing(one_rank_gloo, no_ray_checkpoints, tmp_path):
    """fp16 loss scaling skips a step whose gradients overflow (here: the second micro-batch's loss is inf): the
    loop takes another step in its place, and the skipped one advances neither the step, the EMA, the LR
    schedule nor the logged loss; the line says it was skipped."""
    from emoji_ldm.train import loop
    from emoji_ldm.train.step import PlainEngine

    layer = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    engine = PlainEngine(layer, optimizer, scheduler, 1.0, layer.parameters(), scaler=torch.amp.GradScaler("cpu"))

    def forward(i):
        loss = engine(torch.ones(2, 3)).pow(2).mean()
        return loss * float("inf") if i == 1 else loss, {}

    state = loop.Loop(_toy_recipe(tmp_path, engine, scheduler, list(layer.parameters()), forward,
                                  loop.Schedule(max_steps=3, log_every=1, checkpoint_every=10)))
    state.run()
    assert state.counters == {"step": 3} and state.ema.optimization_step == 3 and scheduler.last_epoch == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r.get("skipped_steps") for r in rows] == [None, 1, None]
    assert all(math.isfinite(r["loss"]) for r in rows) and [s for s, _ in no_ray_checkpoints] == [3]


def test_a_restart_resumes_from_a_checkpoint_the_controller_had_not_registered(one_rank_gloo, tmp_path,
                                                                                monkeypatch):
    """Every rank uploads its checkpoint inside `ray.train.report`, but Ray Train's controller registers it only
    when it next polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). A worker that died in
    between leaves `ray.train.get_checkpoint()` at the checkpoint before (here: none), and the restart went back
    to it. The restart resumes from the newest complete checkpoint under OUT/checkpoints instead, passing over
    one whose upload was cut short: the copy goes up file by file in the folder's listing order, and here it
    stopped after everything but the model states (a node lost mid-upload)."""
    import deepspeed

    from emoji_ldm.train import checkpoint
    from emoji_ldm.train.runner import deepspeed_config

    out, run = tmp_path / "run", "run-20261126-000000"

    class ControllerRegisteredNone(checkpoint.FolderStorage):
        """Each rank's copy, as `ray.train.report` makes it before the controller polls; `attempt()` is None."""

        def publish(self, folder, name, metrics):
            super().publish(folder, name, metrics)
            if name == "step-00000003":
                next((out / "checkpoints" / run / name).glob("ds/*model_states.pt")).unlink()
                raise RuntimeError("the node was lost during the upload")

    storage = ControllerRegisteredNone(str(out), run)

    def engine():
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 1)
        return deepspeed.initialize(model=layer, optimizer=torch.optim.AdamW(layer.parameters(), lr=1e-2),
                                    config=deepspeed_config(2, 1, 1.0, 0, "no"), dist_init_required=False)[0]

    first, cpu = engine(), torch.device("cpu")
    for step in (1, 2, 3):
        first.backward(first(torch.ones(2, 3)).pow(2).mean())
        first.step()
        if step == 2:
            weights = [p.detach().clone() for p in first.module.parameters()]
        with contextlib.nullcontext() if step < 3 else pytest.raises(RuntimeError, match="lost during the upload"):
            checkpoint.save(first, {"step": step}, {"world_size": 1, "zero_stage": 0}, out=str(out), rank=0,
                            device=cpu, storage=storage)
    assert checkpoint.latest(str(out))[1]["step"] == 2

    restarted, counters = engine(), {"step": 0}
    where = checkpoint.restore(restarted, counters, out=str(out), rank=0, device=cpu, storage=storage)
    assert where and where.endswith("step-00000002") and counters == {"step": 2}
    assert all(torch.equal(p, w) for p, w in zip(restarted.module.parameters(), weights))


def test_bf16_run_keeps_an_fp32_ema_and_exports_it(tiny):
    """The session pipeline's run, `train` in bf16 on 2 workers with the other fast-path flags (channels-last,
    gradient checkpointing): config.json says so (the banner's text: test_training_step), the losses are
    numbers, the checkpoint's EMA is fp32 and the exported UNet is exactly that EMA."""
    from diffusers import UNet2DConditionModel

    out = tiny.run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in rows)  # not NaN
    saved = json.loads((out / "config.json").read_text())["run"]["speed"]
    assert saved["precision"] == "bf16" and saved["channels_last"] and saved["gradient_checkpointing"]

    folder, meta = latest_checkpoint(str(out))
    assert meta["step"] == 4  # the last step: the export's
    shadow = torch.load(f"{folder}/ema.pt", weights_only=False)["shadow_params"]
    assert {s.dtype for s in shadow} == {torch.float32}
    unet = UNet2DConditionModel.from_pretrained(str(out / "model" / "unet"))
    exported = list(unet.parameters())
    assert len(exported) == len(shadow)
    assert all(torch.equal(p.data, s) for p, s in zip(exported, shadow))


def test_crash_then_resume_from_s3_continues_exactly(s3_server, tiny, tmp_path):
    """The session pipeline's run (4 steps straight, local, bf16, its checkpoints uploaded in the background:
    `--async-checkpoints`) == the same 4 steps on moto S3, uploaded synchronously, whose rank 1 dies
    at step 4, after its step-3 checkpoint, then `--resume` from s3:// (weights, optimizer, EMA, RNG, data
    position, step, metrics); a resume that does not match is refused. (The pipeline's run also drew sample grids
    at steps 2 and 4: they must not shift the training RNG.)"""
    from ray.train import WorkerGroupError

    client = s3_server.client()
    client.create_bucket(Bucket="harness-runs")
    out, bf16 = "s3://harness-runs/runs/crash", pipeline_speed()  # as the pipeline's run
    assert tiny.card["training"] == {"workers": 2, "zero_stage": 2, "steps": 4, "global_batch": 8}
    with rank1_fails(ldm, at_step=4), \
            pytest.raises(WorkerGroupError, match="Training failed due to worker errors") as died:
        train_fast(tiny.lat, out, max_steps=4, max_failures=0, speed=bf16)
    assert 1 in died.value.worker_failures  # rank 1 died (rank 0 then fails in a collective with it)
    found = latest_checkpoint(out)
    assert found and found[0].startswith("s3://") and found[1]["step"] == 3
    with pytest.raises(UserError, match="already has checkpoints"):
        train_fast(tiny.lat, out, max_steps=4, speed=bf16)
    with pytest.raises(UserError, match="other precision"):
        train_fast(tiny.lat, out, max_steps=4, resume=True)  # fp32
    with pytest.raises(UserError, match="different unet config"):
        train_fast(tiny.lat, out, max_steps=4, resume=True, overrides={"unet.block_out_channels": "32,32"}, speed=bf16)
    with pytest.raises(UserError, match="written by 2 workers"):
        train_fast(tiny.lat, out, max_steps=4, resume=True, workers=1, speed=bf16)
    card = train_fast(tiny.lat, out, max_steps=4, resume=True, speed=bf16)
    assert card["training"]["steps"] == 4
    metrics = client.get_object(Bucket="harness-runs", Key="runs/crash/metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2, 3, 4]

    (folder_a, meta_a), (folder_b, meta_b) = latest_checkpoint(str(tiny.run)), latest_checkpoint(out)
    assert meta_a["step"] == meta_b["step"] == 4
    local_b = tmp_path / "b"
    prefix = folder_b.removeprefix("s3://harness-runs/")
    optimizer = "ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"  # DeepSpeed's rank-0 file of a bf16 run
    for name in ("ema.pt", optimizer):
        (local_b / name).parent.mkdir(parents=True, exist_ok=True)
        client.download_file("harness-runs", f"{prefix}/{name}", str(local_b / name))
    ema_a = torch.load(f"{folder_a}/ema.pt", weights_only=False)["shadow_params"]
    ema_b = torch.load(local_b / "ema.pt", weights_only=False)["shadow_params"]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ema_a, ema_b))
    opt_a = torch.load(f"{folder_a}/{optimizer}", weights_only=False)
    opt_b = torch.load(local_b / optimizer, weights_only=False)
    flat_a = opt_a["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    flat_b = opt_b["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    assert torch.allclose(flat_a, flat_b, atol=1e-6)
