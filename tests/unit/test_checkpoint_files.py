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
