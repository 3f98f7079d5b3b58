"""The loop's EMA (train/ema.py) on in-process DeepSpeed engines over gloo, on CPU: an update sends nothing, the
EMA follows fp32 masters under every ZeRO stage (ZeRO 0 with bf16 included), and the full EMA gathered at a
checkpoint resumes bit-exactly, on one rank and on two (a spawned pair of processes)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "gather", "scatter", "all_to_all_single")


@contextmanager
def counted_collectives():
    """Every torch.distributed collective called inside, as (name, bytes of its tensors), also those DeepSpeed's
    communication backend keeps references to (its all-gather and reduce-scatter functions)."""
    import torch.distributed as dist

    targets = [(dist, name) for name in COLLECTIVES]
    backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    if backend is not None:
        targets += [(backend, name) for name in ("all_gather_function", "reduce_scatter_function")]
    calls, originals = [], {(owner, name): getattr(owner, name) for owner, name in targets}

    def counting(name, original):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))
                        for t in a if isinstance(t, torch.Tensor)]
            calls.append((name, sum(t.numel() * t.element_size() for t in tensors)))
            return original(*args, **kwargs)
        return call

    for (owner, name), original in originals.items():
        setattr(owner, name, counting(name, original))
    try:
        yield calls
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def _init_gloo(rank: int, world: int, store: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "DS_ACCELERATOR": "cpu"})
    from emoji_ldm.train.runner import no_shared_memory_all_reduce

    no_shared_memory_all_reduce()  # as a Ray Train worker on CPU
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _close_gloo() -> None:
    from deepspeed.utils import groups

    torch.distributed.destroy_process_group()
    groups._WORLD_GROUP = None  # DeepSpeed's clone of the world group went with it


@pytest.fixture
def one_rank_gloo(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.setenv(k, os.environ.get(k, ""))  # restored afterwards
    _init_gloo(0, 1, str(tmp_path / "store"))
    yield
    _close_gloo()


def _engine(stage: int, precision: str, seed: int = 0, **config):
    """A two-layer model under DeepSpeed (67 weights: odd, so ZeRO pads and splits a tensor across ranks)."""
    import deepspeed

    from emoji_ldm.train.runner import deepspeed_config

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                                      config={**deepspeed_config(2, 1, 1.0, stage, precision), **config},
                                      dist_init_required=False)
    return engine, params


def _step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(engine.module.parameters()).dtype
    loss = engine(torch.randn(2, 4, generator=g).to(dtype)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()


def _loop(engine, params, out: Path, monkeypatch):
    """The loop's state around `engine` (one rank, no Ray): what it keeps as its EMA."""
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train import checkpoint, loop
    from emoji_ldm.train.runner import Worker

    monkeypatch.setattr(checkpoint, "restore", lambda *args, **kwargs: None)
    recipe = loop.Recipe(tag="toy", out=str(out), worker=Worker(0, 1, torch.device("cpu"), "no", torch.float32),
                         engine=engine, scheduler=engine.lr_scheduler, zero_stage=0, params=params, micro=2,
                         batches=lambda counters: iter(()), forward=None, describe="a toy",
                         schedule=loop.Schedule(max_steps=1, log_every=1, checkpoint_every=1),
                         ema=get_preset("tiny").train)
    return loop.Loop(recipe)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_an_ema_update_sends_nothing(one_rank_gloo, tmp_path, monkeypatch, stage):
    """The loop's EMA update after a bf16 ZeRO step: no collective, 0 bytes (the EMA of the masters each rank owns),
    where a full fp32 copy of every tensor was all-reduced before."""
    engine, params = _engine(stage, "bf16")
    state = _loop(engine, params, tmp_path, monkeypatch)
    _step(engine, 1)
    with counted_collectives() as calls:
        state.ema.step()
    assert calls == [] and state.ema.optimization_step == 1


def test_zero0_half_precision_ema_follows_the_fp32_masters(one_rank_gloo, tmp_path, monkeypatch):
    """ZeRO 0 with half-precision weights (fp16 on a GPU; here DeepSpeed's bf16 block, which runs the same unfused
    optimizer on CPU): the optimizer keeps fp32 copies it links to no parameter. The EMA's first update (decay 0)
    copies exactly those masters, not the half-precision weights."""
    engine, params = _engine(0, "no", bf16={"enabled": True})
    assert type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer" and params[0].dtype == torch.bfloat16
    state = _loop(engine, params, tmp_path, monkeypatch)
    _step(engine, 1)
    state.ema.step()
    shadows = state.ema.state_dict()["shadow_params"]
    masters = [m for group in engine.optimizer.fp32_groups for m in group]
    assert all(torch.equal(s, m) for s, m in zip(shadows, masters, strict=True))
    assert not all(torch.equal(s, p.float()) for s, p in zip(shadows, params))  # the masters are not bf16 values


def test_zero0_bf16_ema_follows_the_fp32_weights(one_rank_gloo, tmp_path, monkeypatch):
    """ZeRO 0 with --precision bf16 is autocast over fp32 weights: each weight is its own master."""
    engine, params = _engine(0, "bf16")
    assert params[0].dtype == torch.float32
    state = _loop(engine, params, tmp_path, monkeypatch)
    _step(engine, 1)
    state.ema.step()
    assert all(torch.equal(s, p) for s, p in zip(state.ema.state_dict()["shadow_params"], params, strict=True))


def test_a_zero3_ema_update_reads_the_flat_partitions(one_rank_gloo, monkeypatch):
    """ZeRO-3: DeepSpeed's per-parameter accessor (`safe_get_local_fp32_param`) synchronizes its reduce stream on
    every call. An EMA update reads none: it moves towards the optimizer's flat fp32 partitions in one go, to the
    values the per-parameter way gives."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.ema import PartitionedEMA, local_master, make_ema

    spec = get_preset("tiny").train
    engine, params = _engine(3, "bf16")
    ema = PartitionedEMA(engine, params, spec, rank=0)
    per_parameter = make_ema([local_master(p, {}, 0)[1] for p in params], spec)  # the per-parameter way
    calls, accessor = [], DeepSpeedZeroOptimizer_Stage3.get_local_fp32_param
    monkeypatch.setattr(DeepSpeedZeroOptimizer_Stage3, "get_local_fp32_param",
                        lambda self, *args, **kwargs: (calls.append(1), accessor(self, *args, **kwargs))[1])
    for seed in range(3):
        _step(engine, seed)
        calls.clear()
        ema.step()
        assert calls == []
        per_parameter.step(local_master(p, {}, 0)[1] for p in params)
    shadows = ema.state_dict()["shadow_params"]
    assert all(torch.equal(s, e.view(s.shape)) for s, e in zip(shadows, per_parameter.shadow_params, strict=True))
    assert ema.optimization_step == per_parameter.optimization_step == 3


def test_a_bf16_weight_without_masters_is_refused(one_rank_gloo):
    from emoji_ldm.errors import UserError
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.ema import PartitionedEMA

    weight = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(UserError, match=r"keeps none for a torch.bfloat16 weight of shape \(2, 3\): train with "
                                        r"--zero-stage 1 or more, or --precision no"):
        PartitionedEMA(object(), [weight], get_preset("tiny").train, rank=0)


def test_a_channels_last_weight_keeps_its_shape_and_round_trips():
    """Under ZeRO 0 the EMA follows the parameter itself, which channels-last converts in place: its master is
    kept as it is (a flat view of it does not exist), and the full state is the plain tensor."""
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.ema import PartitionedEMA

    weight = torch.nn.Parameter(torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last))
    ema = PartitionedEMA(object(), [weight], get_preset("tiny").train, rank=0)
    ema.step()
    state = ema.state_dict()
    assert torch.equal(state["shadow_params"][0], weight.detach())
    again = PartitionedEMA(object(), [torch.nn.Parameter(torch.zeros(4, 3, 2, 2))], get_preset("tiny").train, 0)
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["shadow_params"][0], weight.detach())


@pytest.mark.parametrize("stage,precision", [(0, "no"), (2, "bf16"), (3, "bf16"), (3, "no")])
def test_the_checkpointed_ema_resumes_bit_exactly(one_rank_gloo, tmp_path, stage, precision):
    """3 steps, the full EMA saved as a checkpoint's ema.pt, then a fresh EMA (started from other values) loads it:
    2 more steps from the same masters give the same bits as the EMA that never stopped."""
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.checkpoint import load_tensors
    from emoji_ldm.train.ema import PartitionedEMA

    spec = get_preset("tiny").train
    engine, params = _engine(stage, precision)
    ema = PartitionedEMA(engine, params, spec, rank=0)
    assert (ema.flat is not None) == (stage == 3)  # ZeRO-3 reads the flat partitions, fp32 ones included
    for seed in range(3):
        _step(engine, seed)
        ema.step()
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    _step(engine, 3)
    resumed = PartitionedEMA(engine, params, spec, rank=0)  # its shadows start at the masters of step 4
    resumed.load_state_dict(load_tensors(tmp_path / "ema.pt", mmap=True))
    for seed in range(4, 6):
        ema.step()
        resumed.step()
        _step(engine, seed)
    a, b = ema.state_dict(), resumed.state_dict()
    assert resumed.optimization_step == ema.optimization_step == 5
    assert all(torch.equal(x, y) for x, y in zip(a["shadow_params"], b["shadow_params"], strict=True))


# --- two ranks -------------------------------------------------------------------------------------------------


def _two_ranks(rank: int, store: str, folder: str) -> None:
    """One rank of the pair: for ZeRO 2 and 3, the update's traffic, the gather (bit-exact, rank 0 only), a resume
    from the gathered file, and DreamBooth's export reading the masters."""
    _init_gloo(rank, 2, store)
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.checkpoint import load_tensors
    from emoji_ldm.train.ema import PartitionedEMA, master_weights

    spec = get_preset("tiny").train
    for stage in (2, 3):
        engine, params = _engine(stage, "bf16")
        ema = PartitionedEMA(engine, params, spec, rank)
        _step(engine, rank)
        with counted_collectives() as calls:
            ema.step()
        assert calls == [], calls
        owned, total = sum(s.numel() for s in ema.ema.shadow_params), sum(getattr(p, "ds_numel", p.numel())
                                                                            for p in params)
        assert 0 < owned < total  # each rank averages its own part only
        ema.ema.shadow_params[0].view(-1)[0] = -0.0  # a float sum over the ranks would make it +0.0
        full = [m.detach().float().cpu().clone() for m in master_weights(params)]  # every rank
        state = ema.state_dict()
        if rank == 0:
            shadows = state["shadow_params"]
            assert [s.shape for s in shadows] == [f.shape for f in full]
            assert sum(bool(torch.signbit(s).logical_and(s == 0).any()) for s in shadows) >= 1
            torch.save(state, f"{folder}/ema-{stage}.pt")
        else:
            assert state is None
        torch.distributed.barrier()
        again = PartitionedEMA(engine, params, spec, rank)
        again.load_state_dict(load_tensors(f"{folder}/ema-{stage}.pt", mmap=True))
        if rank == 0:
            assert all(torch.equal(x.view(torch.int32), y.view(torch.int32))
                       for x, y in zip(again.state_dict()["shadow_params"], shadows, strict=True))
        else:
            assert again.state_dict() is None
        _export_reads_masters_to_rank0(engine, rank)
    _close_gloo()


def _export_reads_masters_to_rank0(engine, rank: int) -> None:
    """DreamBooth's export: rank 0 gets the full masters; rank 1 takes part without receiving any full tensor
    (no all-reduce, all-gather or broadcast: a reduce to rank 0 only)."""
    from unittest import mock

    from emoji_ldm.train import dreambooth_lora

    class Loaded(Exception):
        pass

    # this spawned process only: rank 0 stops where the base is loaded
    with mock.patch("emoji_ldm.models.builders.load_sd_pipeline", side_effect=Loaded), \
            mock.patch("emoji_ldm.store.artifacts.local_copy", side_effect=lambda uri: uri), \
            counted_collectives() as calls:
        try:
            dreambooth_lora.export(engine, mock.Mock(base="base"), rank, None)
        except Loaded:
            assert rank == 0
    if rank == 1:
        assert {name for name, _ in calls} <= {"reduce"}, calls


def test_two_ranks_keep_their_own_partitions_and_gather_exactly(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
