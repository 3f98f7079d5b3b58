"""The one training loop (train/loop.py) outside Ray Train: one process, a `PlainEngine`, checkpoints in a folder
(`checkpoint.FolderStorage`). A run stopped after a checkpoint and resumed ends where an unbroken run ends, bit
for bit: the weights, the optimizer, the LR schedule and the data position all come back."""

from __future__ import annotations

import torch

from emoji_ldm.train import loop
from emoji_ldm.train.checkpoint import FolderStorage, latest
from emoji_ldm.train.lr import warmup_cosine
from emoji_ldm.train.runner import Worker
from emoji_ldm.train.step import PlainEngine


def _recipe(out, max_steps: int) -> loop.Recipe:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 6, 0.1))
    engine = PlainEngine(model, optimizer, schedule, 1.0, model.parameters())
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))  # (64, 4)
    y = x.sum(1, keepdim=True)  # (64, 1)

    def batches(counters: dict):
        while True:
            i = counters["pos"] % 8
            counters["pos"] += 1
            yield x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]

    def forward(batch):
        inputs, target = batch
        return torch.nn.functional.mse_loss(engine(inputs), target), {}

    return loop.Recipe(tag="t", out=str(out), worker=Worker(0, 1, torch.device("cpu"), "no", torch.float32),
                       engine=engine, scheduler=schedule, zero_stage=0, params=list(model.parameters()), micro=8,
                       schedule=loop.Schedule(max_steps, 2, 2, grad_accum=2), batches=batches, forward=forward,
                       describe="a toy regression", counters={"step": 0, "pos": 0}, storage=FolderStorage(str(out)))


def test_a_run_resumed_from_its_folder_ends_where_an_unbroken_one_does(tmp_path):
    whole = _recipe(tmp_path / "whole", 6)
    loop.run(whole)
    stopped = _recipe(tmp_path / "resumed", 4)
    loop.run(stopped)
    assert latest(str(tmp_path / "resumed"))[1]["step"] == 4
    resumed = _recipe(tmp_path / "resumed", 6)
    loop.run(resumed)  # restores step 4 (weights, AdamW, schedule, data position), then steps 5 and 6
    assert latest(str(tmp_path / "resumed"))[1] == {**latest(str(tmp_path / "whole"))[1]}
    for a, b in zip(whole.engine.module.parameters(), resumed.engine.module.parameters()):
        assert torch.equal(a, b)
    assert resumed.scheduler.get_last_lr() == whole.scheduler.get_last_lr()
