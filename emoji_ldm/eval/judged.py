"""What `eval` measures with the judge: emoji-FID/KID and precision/recall in its features, legibility at chat
size, and prompt accuracy with its interval beside the baselines (`protocol.py`), all on the same held-out
captions."""

from __future__ import annotations

import numpy as np

from emoji_ldm.eval.protocol import BOOTSTRAP, LEVEL, caption_scores, prompt_accuracy_figures, summary_line


def _labels(judge, heldout: dict) -> tuple[list[str | None], list[str | None]]:
    """Each held-out row's class (None where the judge has no such class) and its Unicode group."""
    from emoji_ldm.eval.judge_net import row_label

    kind, classes = judge.meta["label"], set(judge.classes)
    rows = list(zip(heldout["source_url"], heldout["title"], heldout["tag"]))
    truth = [y if y in classes else None for y in (row_label(kind, u, t, g) for u, t, g in rows)]
    groups = [row_label("group", u, t, g) if kind != "tag" else None for u, t, g in rows]
    return truth, groups


def _stand_in(images: list, size: int) -> list:
    """A fully transparent image where retrieval found nothing: judged, it reads as no class in particular."""
    from PIL import Image

    return [im if im is not None else Image.new("RGBA", (size, size), (0, 0, 0, 0)) for im in images]


def judge_report(judge, heldout: dict, images: list, k: int, empty: list | None, retrieved: dict,
                 real_mode: bool, seed: int) -> dict:
    """The judge's figures. `images`: k per held-out caption, caption-major (for `--real`, k = 1 real training
    images, and the prompt accuracy is that of the held-out images themselves); `empty`: the model's images for
    the prompt "" (None for `--real`); `retrieved`: `retrieval.retrieve`'s."""
    from emoji_ldm.eval.legibility import legibility
    from emoji_ldm.eval.scores import judge_metrics

    truth, groups = _labels(judge, heldout)
    real_px, fake_px = judge.pixels(heldout["image"]), judge.pixels(images)  # (N, S, S, 3), (N*k, S, S, 3) uint8
    per_row = {"real": caption_scores(judge.predict(real_px), truth, 1)}
    per_row["model"] = per_row["real"] if real_mode else caption_scores(judge.predict(fake_px), truth, k)
    found = _stand_in(retrieved["images"], heldout["image"][0].size[0])
    per_row["retrieval"] = caption_scores(judge.predict(judge.pixels(found)), truth, 1)
    index = {c: i for i, c in enumerate(judge.classes)}
    empty_classes = None
    if empty is not None:
        empty_classes = (np.array([index[p] for p in judge.predict(judge.pixels(empty))], dtype=np.int64),
                         np.array([index.get(t, 0) for t in truth], dtype=np.int64))
    figures = prompt_accuracy_figures(per_row, groups, empty_classes, seed=seed)
    repeated = [t for t in truth for _ in range(k)]
    chat = {"samples": legibility(judge, heldout["image"] if real_mode else images,
                                  truth if real_mode else repeated),
            "real": legibility(judge, heldout["image"], truth)}
    labelled = sum(t is not None for t in truth)
    everything = figures["all"]
    return {**judge_metrics(judge, real_px, fake_px[::k]), "legibility": chat,
            "judge": {"content_id": judge.meta.get("content_id"), "uri": judge.meta.get("uri"),
                      "label": judge.meta["label"], "classes": len(judge.classes),
                      "val_accuracy": judge.meta.get("val_accuracy"), "dataset": judge.meta.get("dataset")},
            "prompt_accuracy": everything["model"]["mean"] if everything else None,
            "real_accuracy": everything["real"]["mean"] if everything else None,
            "labelled_samples": labelled,
            "protocol": {"samples_per_caption": k, "captions": len(truth), "labelled_captions": labelled,
                         "interval": f"{LEVEL:.0%} percentile bootstrap over captions ({BOOTSTRAP} resamples, "
                                     "the same resampled captions for every system; the empty prompt's images "
                                     "resampled too)",
                         "emoji_fid_over": "one sample per caption (its first seed) against the held-out images",
                         "retrieval": retrieved["method"], "figures": figures},
            "summary": summary_line(figures)}
