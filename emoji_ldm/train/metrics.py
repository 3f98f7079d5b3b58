"""Rank 0's record of a training run, the same for every recipe.

One printed line per logged step, `metrics.jsonl` (one row per logged step), `loss.png`, TensorBoard events
under `tensorboard/` and validation grids under `samples/`, written locally and copied to OUT on `flush`
(every checkpoint and every grid). A resumed run keeps the history up to the checkpoint it resumed from, and
TensorBoard hides the steps the killed run had logged after it (`purge_step`).
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def print_once(line: str) -> None:
    """A line on a Ray Train worker's real stdout, once. Ray Train's print patch would also copy `print` to its
    logger, and the driver would show every line twice."""
    sys.__stdout__.write(f"{line}\n")
    sys.__stdout__.flush()


class MetricsLogger:
    def __init__(self, out: str, tag: str, max_steps: int, resumed_at: int = 0, config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        from emoji_ldm.store.artifacts import artifact_uri, exists, read_bytes

        self.out, self.tag, self.max_steps = out, tag, max_steps
        self.local = Path(tempfile.mkdtemp(prefix=f"emoji-ldm-{tag}-"))
        self.rows: list[dict] = []
        self.last_loss = None
        previous = artifact_uri(out, "metrics.jsonl")
        if resumed_at and exists(previous):
            rows = [json.loads(line) for line in read_bytes(previous).decode().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["step"] <= resumed_at]
        self.tb = SummaryWriter(str(self.local / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)
        if config is not None and not resumed_at:
            self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step: int, loss: float, lr: float, step_time: float, images_per_s: float | None = None,
            grad_norm: float | None = None, **parts: float) -> None:
        """One logged step: the mean loss over the ranks and the steps since the last line, and its parts."""
        self.last_loss = loss
        row = {"step": step, "loss": loss, **parts, "lr": lr, "step_time_s": step_time,
               "images_per_s": images_per_s, "grad_norm": grad_norm, "time": time.time()}
        for name, value in row.items():
            if name not in ("step", "time", "step_time_s") and value is not None:
                self.tb.add_scalar(f"train/{name}", value, step)
        self.rows.append(row)
        extra = "".join(f", {k.removesuffix('_loss')} {v:.4f}" for k, v in parts.items())
        speed = f" {images_per_s:.0f} images/s" if images_per_s is not None else ""
        self.print(f"step {step}/{self.max_steps} loss {loss:.4f}{f' ({extra[2:]})' if extra else ''} lr {lr:.2e} "
                   f"{step_time * 1000:.0f} ms/step{speed}")

    def print(self, line: str) -> None:
        print_once(f"[{self.tag}] {line}")

    def grid(self, grid, step: int) -> None:
        """A validation grid (a PIL image) as samples/step-XXXXXXXX.png and a TensorBoard image."""
        (self.local / "samples").mkdir(exist_ok=True)
        grid.save(self.local / "samples" / f"step-{step:08d}.png")
        self.tb.add_image("validation/samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        self.flush()

    def flush(self) -> None:
        from emoji_ldm.store.artifacts import artifact_uri, upload_dir, write_bytes

        if self.rows:
            write_bytes(artifact_uri(self.out, "metrics.jsonl"),
                        "".join(json.dumps(r) + "\n" for r in self.rows).encode())
            write_bytes(artifact_uri(self.out, "loss.png"), loss_curve_png(self.rows))
        if (self.local / "samples").exists():
            upload_dir(self.local / "samples", artifact_uri(self.out, "samples"))
        self.tb.flush()
        upload_dir(self.local / "tensorboard", artifact_uri(self.out, "tensorboard"))


def loss_curve_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1.2)
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"mean of {k}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --- profiling ----------------------------------------------------------------------------------------------


def start_profile(device):
    """torch's profiler, recording host ops (and, on CUDA, the device's kernels) until `finish_profile`."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    prof.start()
    return prof, time.perf_counter(), device.type == "cuda"


def finish_profile(profile, out: str, log) -> None:
    """Stop it; OUT/profile/trace-rank0.json (Chrome's trace viewer, Perfetto) and the busiest ops in the log."""
    from emoji_ldm.store.artifacts import artifact_uri, write_bytes

    prof, started, cuda = profile
    prof.stop()
    wall = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        uri = artifact_uri(out, "profile", "trace-rank0.json")
        write_bytes(uri, Path(f"{tmp}/trace.json").read_bytes())
    busy = busy_share(prof, wall) if cuda else None
    log.print(f"profile: {wall:.1f} s recorded, {uri}" + (f", GPU busy {busy:.0%} of it" if busy is not None else ""))
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=10)
    for line in table.splitlines():
        log.print(line)


def busy_share(prof, wall_s: float) -> float | None:
    """The union of the device's kernel and copy intervals over the profiled window's wall time."""
    from torch.autograd import DeviceType

    try:
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
    except Exception as e:  # the figure is lost, not the run's others
        print(f"the profiler's events did not parse: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if not spans:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy, lo, hi = busy + hi - lo, a, b
        else:
            hi = max(hi, b)
    return (busy + hi - lo) / 1e6 / wall_s
