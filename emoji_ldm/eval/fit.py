"""The judge's training loop, one function for both ways a judge is made: a dataset's sample inside a Ray task
(`train-judge --data`), and the frozen judge from the Twemoji pack in this process (`frozen_judge.py`).

Deterministic for given inputs, settings and torch build: the order of the rows, the seed of the batch order and
of the augmentation, and (with `deterministic=True`: one torch thread and torch's deterministic algorithms) the
arithmetic. Bit-for-bit equality across CPU kinds is not promised: oneDNN and BLAS pick kernels per instruction
set, which is why the frozen judge is a committed artifact with its content id, not a promise to rebuild.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import numpy as np

from emoji_ldm.errors import UserError


@contextlib.contextmanager
def deterministic_torch(threads: int, on: bool):
    """torch with `threads` threads, and (when `on`) deterministic algorithms and one thread; restored after."""
    import torch

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(1 if on else threads)
    if on:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def _indexed(pixels: np.ndarray, labels: list[str], index: dict[str, int]):
    """(N, S, S, 3) uint8 and class names -> (n, 3, S, S) uint8 and (n,) class ids of the known classes."""
    import torch

    keep = np.array([y in index for y in labels], dtype=bool)
    x = torch.from_numpy(pixels[keep] if len(labels) else pixels[:0]).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([index[v] for v in labels if v in index], dtype=torch.long)
    return x, y, int((~keep).sum()) if len(labels) else 0


def fit_judge(config, train: tuple[np.ndarray, list[str]], val: tuple[np.ndarray, list[str]],
              deterministic: bool = False) -> tuple[object, dict]:
    """Train a judge net on (pixels (N, S, S, 3) uint8, classes) and measure it on the held-out pair.

    `config` is a `JudgeConfig` (label, image_size, width, epochs, batch_size, lr, min_class_rows, seed, threads,
    use_gpu). Returns the net (eval mode, on the CPU) and its meta: classes, sizes, held-out accuracy beside
    the majority class and chance.
    """
    import torch

    from emoji_ldm.eval.judge_net import Judge, build_net

    counts = Counter(train[1])
    classes = sorted(c for c, n in counts.items() if n >= config.min_class_rows)
    if len(classes) < 2:
        raise UserError(f"train-judge: {config.data or 'the Twemoji pack'} has {len(classes)} class(es) with at "
                        f"least {config.min_class_rows} training rows under --label {config.label}; the judge "
                        "needs 2 or more (Twemoji-style file names or titles for subgroup/group, or rows with tags "
                        "for tag)")
    index = {c: i for i, c in enumerate(classes)}
    x, y, dropped = _indexed(*train, index)
    vx, vy, _ = _indexed(*val, index)
    t0 = time.perf_counter()
    with deterministic_torch(config.threads, deterministic):
        torch.manual_seed(config.seed)
        device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
        net = build_net(len(classes), config.width).to(device)
        loss = _train_loop(config, net, x, y, device)
        net.eval().cpu()
        judge = Judge(net, {"classes": classes, "image_size": config.image_size})
        predicted = judge.predict(vx.permute(0, 2, 3, 1).numpy()) if len(vy) else []
    correct = sum(p == classes[t] for p, t in zip(predicted, vy.tolist()))
    majority = Counter(vy.tolist()).most_common(1)[0][1] / len(vy) if len(vy) else 0.0
    return net, {
        "classes": classes, "label": config.label, "image_size": config.image_size, "width": config.width,
        "train_rows": len(y), "train_rows_dropped": dropped,
        "val_rows": len(vy), "val_accuracy": correct / len(vy) if len(vy) else None,
        "majority_baseline": majority, "chance": 1 / len(classes), "epochs": config.epochs,
        "final_train_loss": loss, "train_seconds": round(time.perf_counter() - t0, 1),
    }


def _train_loop(config, net, x, y, device) -> float:
    """AdamW with a one-cycle schedule, label smoothing and small random translations; the last batch's loss."""
    import torch

    steps = config.epochs * max(1, -(-len(x) // config.batch_size))
    opt_ = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt_, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(config.seed)
    net.train()
    loss = torch.zeros(())
    for _ in range(config.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(config.batch_size):
            xb = x[idx].float().div(255.0)  # (B, 3, S, S)
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # small translations: a cheap augmentation
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(xb.to(device)), y[idx].to(device), label_smoothing=0.1)
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            sched.step()
    return float(loss.item())
