"""The caption-retrieval baseline: for each held-out caption, the real image of the most similar training caption.

What a model that only looked its prompt up in its training data would draw. Similarity is by string, not by a
text encoder (a model's encoder is not there for `--real`, and the latent table's text states change form
between presets): the Jaccard similarity of the two captions' word sets, leaving out the words of more than
half the held-out captions (a caption template's "emoji", "on a transparent background", which say nothing
about which emoji). Ties go to the smaller content id, so the baseline is the same on every run.

Bounded at any table size: the dataset version is streamed through Ray Data tasks, each keeping its batch's
training-split rows and returning, per held-out caption, only its batch's best match (score, id, PNG); the
driver folds them into one image per caption.
"""

from __future__ import annotations

import io
import re

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str | None) -> frozenset[str]:
    return frozenset(_WORD.findall((text or "").lower()))


def template_words(captions: list[str]) -> frozenset[str]:
    """Words in more than half of `captions`: a template's, not the emoji's."""
    counts: dict[str, int] = {}
    for c in captions:
        for w in words(c):
            counts[w] = counts.get(w, 0) + 1
    return frozenset(w for w, n in counts.items() if n > len(captions) / 2)


def _best_batch(batch: dict, queries: list[frozenset], common: frozenset) -> dict:
    """Ray Data task: a batch of dataset rows -> per query that shares a word with one of its training-split
    rows, the best of them: {"query", "score", "id", "image"}, one row per query at most."""
    from emoji_ldm.store.splits import split_of

    q = len(queries)
    score, ids, images = np.zeros(q), np.full(q, "", dtype=object), np.full(q, b"", dtype=object)
    for i, row_id in enumerate(batch["id"]):
        if split_of(row_id) != "train":
            continue
        found = words(batch["caption"][i] or batch["title"][i]) - common
        if not found:
            continue
        for j, query in enumerate(queries):
            s = len(found & query) / len(found | query) if query else 0.0
            if s > score[j] or (s == score[j] and s > 0 and row_id < ids[j]):
                score[j], ids[j], images[j] = s, row_id, batch["image"][i]
    found_any = np.flatnonzero(score > 0)  # a caption that shares no word with a row has no match in it
    return {"query": found_any, "score": score[found_any], "id": ids[found_any].astype(str),
            "image": images[found_any]}


def retrieve(meta: dict, captions: list[str]) -> dict:
    """The caption-retrieval baseline for `captions` from the training split of the dataset version the latent
    table (`meta`) was encoded from: {"images": one RGBA PIL image per caption (None when no training caption
    shares a word with it: `judged.py` judges a blank image there), "scores": each match's similarity (0: none),
    "method": how it was matched}."""
    from PIL import Image

    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.store.delta import read_dataset
    from emoji_ldm.store.uri import DatasetRef

    ensure_ray()
    common = template_words(captions)
    queries = [words(c) - common for c in captions]
    ds, _ = read_dataset(DatasetRef(DatasetRef.parse(meta["dataset"]).uri, version=meta["dataset_version"]),
                         columns=["id", "image", "caption", "title"])
    best = ds.map_batches(_best_batch, fn_kwargs={"queries": queries, "common": common}, batch_size=512,
                          batch_format="numpy")
    score, ids, images = np.zeros(len(captions)), [""] * len(captions), [b""] * len(captions)
    for batch in best.iter_batches(batch_format="numpy", batch_size=1024):
        for j, s, row_id, png in zip(batch["query"], batch["score"], batch["id"], batch["image"]):
            if s > score[j] or (s == score[j] and row_id < ids[j]):
                score[j], ids[j], images[j] = s, str(row_id), png
    return {"images": [Image.open(io.BytesIO(png)).convert("RGBA") if png else None for png in images],
            "scores": [float(s) for s in score],
            "method": "string similarity: Jaccard of caption words, without the words of more than half the "
                      "held-out captions; training split of the dataset version"}
