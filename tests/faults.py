"""Fault injection for the training tests: rank 1 of a recipe's Ray Train workers fails at a chosen step.

Production code has no fault switch. A test swaps the recipe module's `worker` (the function `runner.fit` hands to
Ray Train) for a closure: Ray pickles a closure by value, so the workers need nothing of `tests`. In each worker
the closure wraps `loop.Loop.train_step`, and rank 1 fails once the step it applied is `at_step`: before that
step's log line, grid and checkpoint, as a worker dying mid-run would.

This module imports nothing of the suite's conftest (a subprocess may import it without the suite's settings).
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def rank1_fails(module, at_step: int, marker=None):
    """While in the block, `module`'s training runs fail on rank 1 at optimizer step `at_step`.

    The process exits at once (a crash), and with `marker` (a path) only while that file does not exist yet, so
    the group Ray Train restarts goes on.
    """
    name, original = module.__name__, module.worker
    marker = None if marker is None else str(marker)

    def worker(run):
        import importlib
        import os

        from emoji_ldm.train import loop

        train_step = loop.Loop.train_step

        def failing(self, batches):
            applied = train_step(self, batches)
            if applied and self.counters["step"] == at_step and self.recipe.worker.rank == 1:
                if marker is None or not os.path.exists(marker):
                    if marker is not None:
                        open(marker, "w").close()
                    os._exit(1)
            return applied

        loop.Loop.train_step = failing
        try:
            importlib.import_module(name).worker(run)  # this process's own module: not patched
        finally:
            loop.Loop.train_step = train_step

    module.worker = worker
    try:
        yield
    finally:
        module.worker = original
