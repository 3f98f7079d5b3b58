"""Prompt accuracy with error bars, beside its baselines, over the same held-out captions.

The unit is a held-out caption, not an image: a caption's k samples share its prompt and are not independent,
so each caption scores the share of its k samples the judge puts in its class, and the 95% interval is a
percentile bootstrap over captions (`BOOTSTRAP` resamples, fixed seed). Every system is scored on the same
captions, and the resamples are paired: the same resampled captions for each, so a ratio (model / real images)
has its own interval.

Systems (`SYSTEMS`): "model", the k samples per caption; "real", the held-out rows' own images (one each);
"retrieval", the real image of the nearest training caption (one each); "empty", the model prompted with "":
its class frequencies p (one image per caption, the same prompt for all) score a caption of class c as p[c],
and its resamples draw the empty-prompt images too (a two-way bootstrap).

Subsets: every labelled caption ("all"), those whose Unicode group is not Flags ("no_flags": flag emoji are a
large share of the held-out rows, and a model that draws flags well scores there, not on emoji), and each group.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 2000
LEVEL = 0.95
FLAGS = "Flags"
SYSTEMS = ("model", "real", "retrieval", "empty")
NAMES = {"real": "real images", "empty": "empty prompt", "retrieval": "caption retrieval"}


def caption_scores(predicted: list[str], truth: list[str | None], k: int) -> np.ndarray:
    """Predictions of k images per caption (caption-major: caption i's are i*k .. i*k+k-1) -> (N,) shares of
    each caption's images read as its class; NaN for a caption without a class."""
    hits = np.array([p == truth[i // k] for i, p in enumerate(predicted)], dtype=float).reshape(len(truth), k)
    hits[np.array([t is None for t in truth], dtype=bool)] = np.nan
    return hits.mean(axis=1)


def _interval(draws: np.ndarray) -> list[float]:
    tail = 100 * (1 - LEVEL) / 2
    return [float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))]


def _draws(per_row: dict[str, np.ndarray], rows: np.ndarray, empty, rng, chunk: int = 250) -> dict[str, np.ndarray]:
    """(BOOTSTRAP,) resampled means per system over `rows`, `chunk` resamples at a time (memory: chunk x rows)."""
    out: dict[str, list] = {name: [] for name in [*per_row, *(["empty"] if empty is not None else [])]}
    for start in range(0, BOOTSTRAP, chunk):
        b = min(chunk, BOOTSTRAP - start)
        pick = rows[rng.integers(0, len(rows), size=(b, len(rows)))]  # (b, n) caption indexes
        for name, scores in per_row.items():
            out[name].append(scores[pick].mean(axis=1))
        if empty is not None:
            classes, row_class = empty  # (M,) class index of each empty-prompt image; (N,) each caption's
            m, c = len(classes), int(max(classes.max(initial=0), row_class.max(initial=0))) + 1
            drawn = classes[rng.integers(0, m, size=(b, m))]  # (b, M)
            freq = np.stack([np.bincount(d, minlength=c) for d in drawn]) / m  # (b, C)
            out["empty"].append(np.take_along_axis(freq, row_class[pick], axis=1).mean(axis=1))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def subset_figures(per_row: dict[str, np.ndarray], rows: np.ndarray, empty=None, seed: int = 0) -> dict:
    """Over the captions `rows`: each system's mean and 95% interval, and each one's ratio to the real images
    (paired resamples): {"captions", "model": {"mean", "interval"}, ..., "vs_real": {system: {"ratio",
    "interval"}}}; None without captions."""
    if len(rows) == 0:
        return None
    means = {name: float(scores[rows].mean()) for name, scores in per_row.items()}
    if empty is not None:
        classes, row_class = empty
        freq = np.bincount(classes, minlength=int(row_class.max(initial=0)) + 1) / len(classes)
        means["empty"] = float(freq[row_class[rows]].mean()) if len(freq) else 0.0
    draws = _draws(per_row, rows, empty, np.random.default_rng(seed))
    out: dict = {"captions": int(len(rows))}
    out.update({name: {"mean": means[name], "interval": _interval(draws[name])} for name in means})
    if "real" in means and means["real"] > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["vs_real"] = {name: {"ratio": means[name] / means["real"],
                                     "interval": _interval(np.nan_to_num(draws[name] / draws["real"], nan=0.0,
                                                                         posinf=0.0))}
                              for name in means if name != "real"}
    return out


def prompt_accuracy_figures(per_row: dict[str, np.ndarray], groups: list[str | None], empty=None,
                            seed: int = 0) -> dict:
    """The protocol's figures: {"all", "no_flags", "groups": {group: figures}}; `per_row` holds (N,) scores per
    system (NaN: unlabelled caption), `groups` each caption's Unicode group, `empty` the empty-prompt images'
    class indexes and the captions' (see `subset_figures`)."""
    labelled = ~np.isnan(next(iter(per_row.values())))
    group = np.array([g or "unknown" for g in groups], dtype=object)
    all_rows = np.flatnonzero(labelled)
    figures = {"all": subset_figures(per_row, all_rows, empty, seed),
               "no_flags": subset_figures(per_row, np.flatnonzero(labelled & (group != FLAGS)), empty, seed)}
    figures["groups"] = {g: subset_figures(per_row, np.flatnonzero(labelled & (group == g)), empty, seed)
                         for g in sorted(set(group[all_rows].tolist()))}
    return figures


def _pct(figure: dict) -> str:
    low, high = figure["interval"]
    return f"{100 * figure['mean']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def summary_line(figures: dict, subset: str = "no_flags") -> str:
    """"prompt accuracy (no flags) 31.2% [27.9, 34.6] = 0.82x real images (38.0%), empty prompt 3.1%, caption
    retrieval 22.4%": the model's figure beside the real images' and the baselines' on the same captions."""
    f = figures.get(subset)
    label = {"no_flags": "no flags", "all": "all rows"}.get(subset, subset)
    if f is None:
        return f"prompt accuracy ({label}): no labelled captions"
    line = f"prompt accuracy ({label}) {_pct(f['model'])}"
    if "vs_real" in f:
        line += f" = {f['vs_real']['model']['ratio']:.2f}x real images ({100 * f['real']['mean']:.1f}%)"
    elif "real" in f:
        line += f", real images {100 * f['real']['mean']:.1f}%"
    for name in ("empty", "retrieval"):
        if name in f:
            line += f", {NAMES[name]} {100 * f[name]['mean']:.1f}%"
    return line + f" ({f['captions']} captions)"


def group_lines(figures: dict) -> list[str]:
    """One line per Unicode group: the model | the real images, with intervals."""
    lines = []
    for group, f in figures["groups"].items():
        if f is not None:
            lines.append(f"    {group} ({f['captions']}): {_pct(f['model'])} | real {_pct(f['real'])}")
    return lines
