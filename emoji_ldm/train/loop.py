"""The one training loop: every recipe (`ldm.py`, `dreambooth.py`, `vae.py`) runs in it.

A recipe builds a `Recipe` inside its Ray Train worker: its engine (`runner.create_engine`) and the parameters
it trains, its micro-batches and the loss of one (`forward`), its `Schedule`, what a checkpoint records and a
--resume must match, and, where it has them, an EMA, a validation grid and an export. `run(recipe)` does the
rest, the same for every recipe, split as torchtitan splits it:

- `Loop.train_step`: one optimizer step, `grad_accum` micro-batches through `forward_backward_step` (the
  recipe's forward and loss, then the engine's backward), each followed by the engine's step (DeepSpeed scales
  the loss by the accumulation and updates the weights on the last micro-batch only). A step the engine skipped
  (fp16 overflow: non-finite gradients) advances nothing (the step counter, the EMA, the LR schedule); it is
  counted and logged;
- a non-finite loss ends the run in one line, read where the loop reads its losses anyway (each log line and
  checkpoint, never an extra host sync): no checkpoint of a diverged model is written, so --resume starts from
  the last good one;
- `profile_steps` (`--profile-steps`): rank 0 records that many steps with torch's profiler after 3 warm-up
  steps, writes a Chrome trace under OUT/profile/ and logs the busiest ops;
- after an applied step: the fp32 EMA fed from the optimizer's fp32 masters (`ema.py`: each rank averages its
  own ZeRO partition, with no collective; the full EMA is gathered to rank 0 for a grid and a checkpoint only),
  rank 0's line every `log_every` steps (`metrics.py`), a validation grid every `sample_every` steps (outside the
  training RNG), a checkpoint every `checkpoint_every` steps (`checkpoint.py`), and each of them at the last step;
- at the start: this attempt's checkpoint (after a worker failure) or --resume's, and rank 0's banner with the
  global batch; at the end, the recipe's export.

Every single-process path steps through the same loop: `one_process` builds it around a `step.PlainEngine` (no Ray
Train, no log, no checkpoint), and `Loop.step` takes one optimizer step for a caller that times or inspects steps
itself (`emoji-ldm train-step-check`, gpu_check/, the benchmarks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from emoji_ldm.errors import UserError
from emoji_ldm.train import checkpoint, runner


@dataclass(frozen=True)
class Schedule:
    """When the loop does what, in optimizer steps."""

    max_steps: int
    log_every: int
    checkpoint_every: int
    grad_accum: int = 1  # micro-batches per optimizer step
    sample_every: int = 0  # validation grids every N steps (0: at the last step only), for a recipe with a grid
    profile_steps: int = 0  # steps rank 0 records with torch's profiler, after PROFILE_AFTER steps (0: none)


PROFILE_AFTER = 3  # warm-up steps before a profile: allocator, cuDNN autotuning, a compile


@dataclass
class Recipe:
    """What a recipe gives the loop (built in each worker, after `runner.setup_worker`)."""

    tag: str  # the log lines' tag: train | dreambooth | train-vae
    out: str | None  # the run folder: metrics.jsonl, loss.png, samples/, tensorboard/; None: a caller-driven loop
    worker: runner.Worker
    engine: object  # a DeepSpeed engine (or anything with its backward/step/was_step_applied interface)
    scheduler: object  # the engine's LR schedule
    zero_stage: int
    params: list  # the trained parameters: the EMA follows their fp32 masters
    micro: int  # rows of one micro-batch on one rank
    schedule: Schedule
    # counters -> micro-batches from the position the counters hold, without end; a recipe that keeps a data
    # position (epoch, batch) advances it in `counters` as it yields
    batches: Callable[[dict], Iterator]
    forward: Callable[[object], tuple]  # a micro-batch -> (loss tensor, {name: its logged parts})
    describe: str  # the banner's recipe half: the model, the data, the precision
    counters: dict = field(default_factory=lambda: {"step": 0})  # checkpointed; "step" is the loop's
    meta: dict = field(default_factory=dict)  # what state.json records and a --resume must match
    ema: object = None  # the preset's `TrainSpec` (decay, warm-up) to keep an fp32 EMA with; None: no EMA
    grid: Callable | None = None  # rank 0: (the full EMA, step, log), a validation grid
    export: Callable | None = None  # every rank, after the last step: (the `PartitionedEMA`, log)
    config: dict | None = None  # shown in TensorBoard
    storage: object = None  # where checkpoints go (checkpoint.py): `RayTrainStorage` (None: sync), `FolderStorage`


@dataclass
class _Window:
    """What the steps since the last logged line measured."""

    losses: list = field(default_factory=list)  # one detached loss per micro-batch of an applied step
    parts: dict = field(default_factory=dict)  # name -> one value per micro-batch
    norms: list = field(default_factory=list)  # the gradient norm of each applied step
    images: int = 0  # over every rank
    seconds: float = 0.0
    steps: int = 0  # applied
    skipped: int = 0  # skipped by the engine (the same on every rank)

    def add(self, loss, parts: dict) -> None:
        import torch

        self.losses.append(loss)
        for name, value in parts.items():
            self.parts.setdefault(name, []).append(torch.as_tensor(value).detach())


def run(recipe: Recipe) -> None:
    """Train `recipe` to its last step, then export it."""
    Loop(recipe).run()


def one_process(engine, params: list, forward: Callable, *, micro: int, device, precision: str = "no",
                ema=None, grad_accum: int = 1) -> Loop:
    """The loop of one rank without Ray Train, around `engine` (a `step.PlainEngine`, or a DeepSpeed engine in a
    one-process group), for `Loop.step`: `forward(batch)` -> (loss, parts); `ema` the preset's `TrainSpec` to keep
    the fp32 EMA with (`Loop.ema`), or None."""
    import torch

    from emoji_ldm.train.speed import torch_dtype

    recipe = Recipe(tag="step", out=None, worker=runner.Worker(0, 1, torch.device(device), precision,
                                                               torch_dtype(precision)),
                    engine=engine, scheduler=engine.lr_scheduler, zero_stage=0, params=list(params), micro=micro,
                    schedule=Schedule(max_steps=2**62, log_every=2**62, checkpoint_every=2**62, grad_accum=grad_accum),
                    batches=lambda counters: iter(()), forward=forward, describe="one process", ema=ema)
    return Loop(recipe)


class Loop:
    def __init__(self, recipe: Recipe):
        from emoji_ldm.train.ema import PartitionedEMA
        from emoji_ldm.train.metrics import MetricsLogger

        r, w = recipe, recipe.worker
        self.recipe = r
        # every rank keeps the EMA of the fp32 masters its ZeRO partition owns: an update sends nothing
        self.ema = PartitionedEMA(r.engine, r.params, r.ema, w.rank) if r.ema is not None else None
        self.counters = dict(r.counters)
        self.storage = r.storage or checkpoint.RayTrainStorage()  # one for the run: it holds async marks pending
        resumed = None if r.out is None else checkpoint.restore(r.engine, self.counters, out=r.out, rank=w.rank,
                                                                device=w.device, ema=self.ema, storage=self.storage)
        self.log = MetricsLogger(r.out, r.tag, r.schedule.max_steps, self.counters["step"], r.config) \
            if w.main and r.out is not None else None
        self.window = _Window()
        self.profiler = None
        self.last_loss = None  # the last micro-batch's loss, detached (a device tensor)
        if self.log:
            self._banner(resumed)

    def run(self) -> None:
        r = self.recipe
        batches, first = r.batches(self.counters), self.counters["step"]
        while self.counters["step"] < r.schedule.max_steps:
            self._profile(self.counters["step"] - first)  # counted from this attempt's start (a resume too)
            if self.train_step(batches):
                self.after_step(self.counters["step"])
        self._profile(None)
        batches.close()
        if r.export is not None:
            r.export(self.ema, self.log)
        if r.worker.main and r.out is not None:
            self.storage.commit()  # async uploads: the last marks, once committed (the export ran meanwhile)

    def train_step(self, batches: Iterator) -> bool:
        """One optimizer step over `grad_accum` micro-batches; False when the engine skipped it. A skipped step's
        losses stay out of the logged mean (they trained nothing); its time and images count."""
        from emoji_ldm.train.step import grad_norm

        r, window = self.recipe, self.window
        start = time.perf_counter()
        outputs = []
        for _ in range(r.schedule.grad_accum):
            outputs.append(self.forward_backward_step(next(batches)))
            r.engine.step()  # the optimizer and LR step at the last micro-batch of the step only
        applied = runner.step_applied(r.engine)
        self.last_loss = outputs[-1][0]
        if applied:
            self.counters["step"] += 1
            norm = grad_norm(r.engine)  # before clipping, the same on every rank: a device tensor, read at _log
            if norm is not None:
                window.norms.append(norm)
            if r.ema is not None:
                self.ema.step()  # every rank, its own partition: no collective
            for loss, parts in outputs:
                window.add(loss, parts)
            window.steps += 1
        else:  # fp16 overflow: DeepSpeed skipped the update and the LR step
            window.skipped += 1
        window.images += len(outputs) * r.micro * r.worker.world
        window.seconds += time.perf_counter() - start
        return applied

    def step(self, *micro_batches):
        """One optimizer step over `micro_batches` (the schedule's `grad_accum` of them) for a caller that drives the
        loop itself: the EMA follows, nothing is logged or checkpointed. Returns the last micro-batch's loss, detached
        (a device tensor: not read here)."""
        self.window = _Window()  # the caller measures; nothing accumulates between its steps
        self.train_step(iter(micro_batches))
        return self.last_loss

    def forward_backward_step(self, batch) -> tuple:
        """The recipe's forward and loss of one micro-batch, then the engine's backward: (loss, parts)."""
        r = self.recipe
        loss, parts = r.forward(batch)
        r.engine.backward(loss)
        return loss.detach(), parts

    def after_step(self, step: int) -> None:
        s, last = self.recipe.schedule, step == self.recipe.schedule.max_steps
        if step % s.log_every == 0 or last:
            self._log(step)
        if self.recipe.grid is not None and ((s.sample_every and step % s.sample_every == 0) or last):
            self._grid(step)
        if step % s.checkpoint_every == 0 or last:
            if not (step % s.log_every == 0 or last):  # the window's losses, read here as _log reads them
                self._finite(step, self._means()[0])
            r = self.recipe
            meta = {"world_size": r.worker.world, "zero_stage": r.zero_stage, "device": r.worker.device.type,
                    "precision": r.worker.precision, **r.meta}
            checkpoint.save(r.engine, self.counters, meta, out=r.out, rank=r.worker.rank, device=r.worker.device,
                            ema=self.ema, log=self.log, metrics={"loss": self.log.last_loss if self.log else None},
                            storage=self.storage)

    def _means(self) -> list[float]:
        """The window's mean loss and parts over its micro-batches and the ranks (a collective: every rank)."""
        import torch

        window = self.window  # never empty: the loop measures after an applied step, which adds its losses
        return runner.mean_over_ranks([torch.stack(values).float().mean()
                                       for values in (window.losses, *window.parts.values())], self.recipe.worker)

    def _finite(self, step: int, loss: float) -> None:
        """A non-finite loss ends the run, before a checkpoint could keep the diverged model."""
        import math

        if not math.isfinite(loss):
            lr = self.recipe.scheduler.get_last_lr()[0]
            raise UserError(f"the loss is {loss} by step {step} (learning rate {lr:.3g}): training diverged; "
                            "resume from the last checkpoint (--resume) with a lower learning rate "
                            "(--set train.lr=...) or another precision (--precision no)")

    def _profile(self, step: int | None) -> None:
        """Rank 0's profiler over `profile_steps` steps from PROFILE_AFTER (`step`: of this attempt; None: the
        loop ended)."""
        n, r = self.recipe.schedule.profile_steps, self.recipe
        if not n or not self.log:
            return
        if self.profiler is None and step == PROFILE_AFTER:
            from emoji_ldm.train.metrics import start_profile

            self.profiler = start_profile(r.worker.device)
        elif self.profiler is not None and (step is None or step == PROFILE_AFTER + n):
            from emoji_ldm.train.metrics import finish_profile

            finish_profile(self.profiler, r.out, self.log)
            self.profiler = None

    def _log(self, step: int) -> None:
        """Rank 0's line: the mean over the ranks and the window's micro-batches (a collective: every rank)."""
        import torch

        window, names = self.window, list(self.window.parts)
        means = self._means()
        self._finite(step, means[0])
        if self.log:
            parts = dict(zip(names, means[1:]))
            if window.skipped:
                parts["skipped_steps"] = window.skipped
            self.log.log(step, means[0], self.recipe.scheduler.get_last_lr()[0], window.seconds / window.steps,
                         window.images / window.seconds,
                         float(torch.stack(window.norms).double().mean()) if window.norms else None, **parts)
        self.window = _Window()

    def _grid(self, step: int) -> None:
        import torch

        ema = self.ema.gathered() if self.ema is not None else None  # every rank: a gather to rank 0
        if self.log:
            device = self.recipe.worker.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.recipe.grid(ema, step, self.log)  # must not shift the training RNG stream

    def _banner(self, resumed: str | None) -> None:
        r, c, s, world = self.recipe, self.counters, self.recipe.schedule, self.recipe.worker.world
        if resumed:
            position = ", ".join(f"{k} {v}" for k, v in c.items() if k != "step")
            self.log.print(f"resumed from {resumed} at step {c['step']}" + (f" ({position})" if position else ""))
        self.log.print(f"{world} workers, ZeRO stage {r.zero_stage}, global batch {r.micro * world * s.grad_accum} "
                       f"(micro {r.micro} x {world} workers x accum {s.grad_accum}), steps {c['step']}->"
                       f"{s.max_steps}; {r.describe}")
