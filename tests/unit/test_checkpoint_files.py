"""Checkpoint files come from a bucket others can write: loading one runs no pickled code."""

from __future__ import annotations

import pickle

import pytest
import torch

from emoji_ldm.models.presets import get_preset
from emoji_ldm.train.checkpoint import load_tensors, rng_state
from emoji_ldm.train.ema import make_ema


class _Payload:
    ran = []

    def __reduce__(self):
        return (_Payload.ran.append, ("code ran",))


def test_an_ema_and_rng_state_round_trip(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    ema = make_ema(params, get_preset("tiny").train)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    torch.save(rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    state = load_tensors(tmp_path / "ema.pt")
    assert torch.equal(state["shadow_params"][0], ema.state_dict()["shadow_params"][0])
    assert torch.equal(load_tensors(tmp_path / "rng.pt")["cpu"], torch.get_rng_state())


def test_a_pickled_object_that_runs_code_is_refused(tmp_path):
    torch.save({"shadow_params": [torch.zeros(1)], "x": _Payload()}, tmp_path / "ema.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_tensors(tmp_path / "ema.pt")
    assert _Payload.ran == []


def _restore_on_rank(rank: int, store: str, out: str, seen, results) -> None:
    """One of two gloo ranks: restore with a listing that, on rank 1, is behind (it has not seen step 3 yet, as a
    node with a cached NFS listing would not). Puts (rank, the step restored) on `results`."""
    import ray.train
    import torch.distributed as dist

    from emoji_ldm.train import checkpoint

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        ray.train.get_checkpoint = lambda: None  # this process only: no Ray Train checkpoint registered
        checkpoint.latest = lambda out: seen[rank]

        class Engine:
            def load_checkpoint(self, folder, tag, load_lr_scheduler_states):
                return None, {"step": checkpoint._step(folder)}

        counters = {"step": 0}
        checkpoint.restore(Engine(), counters, out=out, rank=rank, device=torch.device("cpu"))
        results.put((rank, counters["step"]))
    finally:
        dist.destroy_process_group()


def _two_ranks(target, tmp_path, arg) -> list:
    """`target(rank, store, root, arg, results)` in two spawned processes (gloo ranks 0 and 1): what they put."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    ranks = [ctx.Process(target=target, args=(r, str(tmp_path / "store"), str(tmp_path), arg, results))
             for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
    assert [p.exitcode for p in ranks] == [0, 0]
    return [results.get(timeout=5) for _ in ranks]


def test_every_rank_restores_the_checkpoint_rank_0_found(tmp_path):
    """Each rank restoring the newest checkpoint its own listing shows would put the ranks at different steps (a
    hang at the next collective, or ZeRO partitions from two steps): rank 0 lists, and every rank loads that."""

    for step in (2, 3):
        folder = tmp_path / "checkpoints" / "run" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        for rank in (0, 1):
            torch.save(rng_state(torch.device("cpu")), folder / f"rng-rank{rank}.pt")
    seen = {0: (str(tmp_path / "checkpoints" / "run" / "step-00000003"), {"step": 3}),
            1: (str(tmp_path / "checkpoints" / "run" / "step-00000002"), {"step": 2})}
    assert sorted(_two_ranks(_restore_on_rank, tmp_path, seen)) == [(0, 3), (1, 3)]


def test_a_resume_on_another_device_or_precision_is_refused_on_the_driver(tmp_path):
    """A CPU checkpoint resumed with --gpu failed inside every worker (`KeyError: 'cuda'` in the RNG state), and
    fp32 and bf16 keep different optimizer states: both are refused before a worker starts, naming the values."""
    import json

    from emoji_ldm.errors import UserError
    from emoji_ldm.train.runner import refuse_or_resume

    folder = tmp_path / "checkpoints" / "run" / "step-00000002"
    folder.mkdir(parents=True)
    torch.save(rng_state(torch.device("cpu")), folder / "rng-rank0.pt")
    (folder / "state.json").write_text(json.dumps({"step": 2, "world_size": 1, "zero_stage": 0, "device": "cpu",
                                                   "precision": "no"}))
    refuse_or_resume(str(tmp_path), True, use_gpu=False, precision="no")  # the same: resumes
    with pytest.raises(UserError, match=r"other device, precision \(device 'cpu', precision 'no'\)"):
        refuse_or_resume(str(tmp_path), True, use_gpu=True, precision="bf16")
    with pytest.raises(UserError, match=r"other precision \(precision 'no'\)"):
        refuse_or_resume(str(tmp_path), True, use_gpu=False, precision="bf16")


def test_rank_files_and_shared_files_are_told_apart():
    from emoji_ldm.train.checkpoint import rank_of

    assert rank_of("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert rank_of("zero_pp_rank_3_mp_rank_00_model_states.pt") == 3  # ZeRO-3's weights shard
    assert rank_of("zero_pp_rank_0_mp_rank_00_optim_states.pt") == 0
    assert rank_of("rng-rank7.pt") == 7
    for shared in ("mp_rank_00_model_states.pt", "ema.pt", "latest", "state.json", "zero_to_fp32.py"):
        assert rank_of(shared) is None, shared


CHECKPOINT_FILES = ("ds/mp_rank_00_model_states.pt", "ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest", "ema.pt")


def _restore_on_node(rank: int, store: str, root: str, nodes: dict, results) -> None:
    """One of two gloo ranks restoring a checkpoint on a remote filesystem (a SubTreeFileSystem: not pyarrow's
    LocalFileSystem, so it is downloaded), each rank on the node `nodes` gives it. Puts (rank, the files its
    folder held when DeepSpeed would load it, that folder) on `results`."""
    import os

    import pyarrow.fs as pafs
    import ray.train
    import torch.distributed as dist

    from emoji_ldm.train import checkpoint

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        checkpoint.latest = lambda out: None
        checkpoint._node = lambda: nodes[rank]
        remote = ray.train.Checkpoint("checkpoints/run/step-00000003",
                                      filesystem=pafs.SubTreeFileSystem(root, pafs.LocalFileSystem()))

        class Storage:
            def attempt(self):
                return remote

        class Engine:
            def load_checkpoint(self, folder, tag, load_lr_scheduler_states):
                seen = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
                results.put((rank, seen, folder))
                return None, {"step": 3}

        checkpoint.restore(Engine(), {"step": 0}, out=root, rank=rank, device=torch.device("cpu"), storage=Storage())
    finally:
        dist.destroy_process_group()


def test_a_restore_fetches_only_what_the_nodes_ranks_load(tmp_path):
    """From remote storage, each node's lowest rank downloads the files every rank reads and its node's ranks'
    own (optimizer shards, RNG), never another node's; its ranks load from that folder, which is gone after.
    (Two ranks of one node share one download: the S3 crash-resume test, `test_harness.py`, with DeepSpeed.)"""
    import os

    folder = tmp_path / "checkpoints" / "run" / "step-00000003"
    for name in CHECKPOINT_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    for rank in (0, 1):
        torch.save(rng_state(torch.device("cpu")), folder / f"rng-rank{rank}.pt")
    seen = {rank: (files, where) for rank, files, where in _two_ranks(_restore_on_node, tmp_path, {0: "a", 1: "b"})}
    shared = ["ds/mp_rank_00_model_states.pt", "ema.pt", "latest"]
    own = {r: [f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"rng-rank{r}.pt"] for r in (0, 1)}
    for rank in (0, 1):
        assert seen[rank][0] == sorted(shared + own[rank]), rank  # not the other node's rank's shard
        assert not os.path.exists(seen[rank][1])  # deleted once the node's ranks had loaded
    assert seen[0][1] != seen[1][1]  # a folder per node, even where two nodes share a host
