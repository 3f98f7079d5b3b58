"""What `eval` compares a model with, read without bringing a table into the driver: the held-out rows of a
latent table (from its split's files only), the first rows of one split of the dataset version it was encoded
from (a streaming Ray Data filter that stops there), and each sample's nearest image in that version (Ray Data
tasks that return only their batch's minima)."""

from __future__ import annotations

import io

import numpy as np

from emoji_ldm.errors import UserError
from emoji_ldm.eval.scores import nearest_mse


def val_rows(table, n: int):
    """At most `n` rows of the held-out split (the train split when there is no val split): only its files."""
    import pyarrow.dataset as pds

    from emoji_ldm.store.latents import split_files
    from emoji_ldm.store.uri import filesystem

    files = split_files(table, "val") or split_files(table, "train")
    if not files:
        raise UserError(f"the latent table {table.table_uri!r} has no rows to evaluate on")
    fs, _ = filesystem(files[0].uri)
    paths = [filesystem(f.uri)[1] for f in files]
    return pds.dataset(paths, filesystem=fs, format="parquet").head(
        n, columns=["id", "caption", "latent", "latent_shape", "text_emb", "text_shape"])


def _nearest_batch(batch: dict, samples: np.ndarray, size: int) -> dict:
    """Ray Data task: a batch of training PNGs -> its smallest MSE to each sample, (1, S)."""
    from PIL import Image

    from emoji_ldm.imaging import composite

    train = np.stack([np.asarray(composite(Image.open(io.BytesIO(png))).resize(
        (size, size), Image.Resampling.LANCZOS), dtype=np.float32).ravel() / 255.0 for png in batch["image"]])
    return {"nearest": nearest_mse(samples, train)[None, :]}


def nearest_training_mse(meta: dict, samples: np.ndarray, size: int) -> np.ndarray:
    """(S, D) samples -> MSE to the nearest image of the dataset version the model was trained from, (S,).

    Every image of that version is compared (train and held-out alike, so the near-copy share is an upper
    bound), streamed through Ray tasks that return only their batch's minima: no join, no id set.
    """
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.store.delta import read_dataset
    from emoji_ldm.store.uri import DatasetRef

    ensure_ray()
    images, _ = read_dataset(DatasetRef(DatasetRef.parse(meta["dataset"]).uri, version=meta["dataset_version"]),
                             columns=["image"])
    nearest = images.map_batches(_nearest_batch, fn_kwargs={"samples": samples, "size": size}, batch_size=256,
                                 batch_format="numpy")
    best = np.full(len(samples), np.inf)
    for batch in nearest.iter_batches(batch_format="numpy"):
        best = np.minimum(best, batch["nearest"].min(axis=0))
    return best


def _split_rows(batch: dict, split: str) -> dict:
    """Ray Data task: keep the rows of one split (by content hash, as the latent tables split)."""
    from emoji_ldm.store.splits import split_of

    keep = np.array([split_of(i) == split for i in batch["id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def dataset_rows(meta: dict, split: str, n: int) -> dict[str, list]:
    """The first `n` rows of one split of the dataset version a latent table was encoded from.

    A streaming filter that stops once `n` rows came through: the cost is n / (the split's share) rows, not
    the table. Columns: image (PIL), caption (or the title when uncaptioned), source_url, title, tag.
    """
    from PIL import Image

    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.store.delta import read_dataset
    from emoji_ldm.store.uri import DatasetRef

    ensure_ray()
    ds, _ = read_dataset(DatasetRef(DatasetRef.parse(meta["dataset"]).uri, version=meta["dataset_version"]),
                         columns=["id", "image", "caption", "source_url", "title", "tag"])
    rows: dict[str, list] = {k: [] for k in ("image", "caption", "source_url", "title", "tag")}
    kept = ds.map_batches(_split_rows, fn_kwargs={"split": split}, batch_format="numpy", batch_size=512)
    for batch in kept.limit(n).iter_batches(batch_format="numpy", batch_size=256):
        for i, png in enumerate(batch["image"]):
            rows["image"].append(Image.open(io.BytesIO(png)).convert("RGBA"))
            rows["caption"].append(str(batch["caption"][i] or batch["title"][i] or ""))
            for k in ("source_url", "title", "tag"):
                rows[k].append(batch[k][i])
    if len(rows["image"]) < 2:
        raise UserError(f"the dataset {meta['dataset']}@{meta['dataset_version']} has {len(rows['image'])} "
                        f"{split} row(s); eval needs 2 or more")
    return rows
