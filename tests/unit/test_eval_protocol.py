"""The eval protocol's statistics with known inputs: per-caption scores, intervals that resample captions (not
images), the empty-prompt estimator, the flag split, the one-line summary, and reports that refuse to compare
across judges."""

from __future__ import annotations

import re

import numpy as np
import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.eval.compare import ratio, same_judge
from emoji_ldm.eval.evaluate import EvalConfig
from emoji_ldm.eval.protocol import (
    caption_scores,
    prompt_accuracy_figures,
    subset_figures,
    summary_line,
)


def test_caption_scores_are_the_share_of_each_captions_samples():
    predicted = ["a", "a", "b", "a", "c", "c"]  # 3 captions x 2 samples, caption-major
    scores = caption_scores(predicted, ["a", "a", None], k=2)
    assert scores[:2].tolist() == [1.0, 0.5] and np.isnan(scores[2])


def test_the_interval_resamples_captions_not_samples():
    """100 captions, each drawn 4 times, every caption's samples all right or all wrong: 50%, with the spread of
    100 draws (about +-10 points), not of 400 (+-5)."""
    k = 4
    truth = ["x"] * 100
    predicted = [("x" if i < 50 else "y") for i in range(100) for _ in range(k)]
    per_row = {"model": caption_scores(predicted, truth, k), "real": np.ones(100)}
    f = subset_figures(per_row, np.arange(100))
    low, high = f["model"]["interval"]
    assert f["model"]["mean"] == 0.5 and low < 0.5 < high
    assert high - low > 0.16, (low, high)  # 400 independent images would give about 0.10
    assert f["real"] == {"mean": 1.0, "interval": [1.0, 1.0]}
    assert f["vs_real"]["model"]["ratio"] == 0.5 and f["captions"] == 100
    assert subset_figures(per_row, np.arange(100)) == f  # a fixed seed: the same figures every run


def test_the_empty_prompt_scores_each_caption_by_its_class_frequency():
    """Empty-prompt images all read as class 0: a caption of class 0 scores 1, any other 0."""
    row_class = np.array([0] * 30 + [1] * 70)
    per_row = {"model": np.zeros(100), "real": np.ones(100)}
    f = subset_figures(per_row, np.arange(100), empty=(np.zeros(100, dtype=np.int64), row_class))
    assert f["empty"]["mean"] == pytest.approx(0.3)
    low, high = f["empty"]["interval"]
    assert low < 0.3 < high and f["vs_real"]["empty"]["ratio"] == pytest.approx(0.3)


def test_flags_are_reported_apart_and_per_group():
    groups = ["Flags"] * 20 + ["Animals & Nature"] * 30 + [None] * 10
    model = np.array([1.0] * 20 + [0.0] * 30 + [np.nan] * 10)  # the last 10 captions: no class the judge knows
    figures = prompt_accuracy_figures({"model": model, "real": np.ones(60)}, groups)
    assert figures["all"]["captions"] == 50 and figures["all"]["model"]["mean"] == pytest.approx(0.4)
    assert figures["no_flags"]["captions"] == 30 and figures["no_flags"]["model"]["mean"] == 0.0
    assert set(figures["groups"]) == {"Flags", "Animals & Nature"}
    assert figures["groups"]["Flags"]["model"]["mean"] == 1.0


def test_the_summary_line_sets_the_figure_beside_the_real_images_and_the_baselines():
    rng = np.random.default_rng(0)
    per_row = {"model": rng.uniform(0, 0.6, 200), "real": rng.uniform(0.2, 0.8, 200),
               "retrieval": rng.uniform(0, 0.4, 200)}
    figures = prompt_accuracy_figures(per_row, ["Smileys & Emotion"] * 200,
                                      empty=(rng.integers(0, 5, 200), rng.integers(0, 5, 200)))
    line = summary_line(figures)
    pattern = (r"prompt accuracy \(no flags\) \d+\.\d% \[\d+\.\d, \d+\.\d\] = \d\.\d\dx real images \(\d+\.\d%\), "
               r"empty prompt \d+\.\d%, caption retrieval \d+\.\d% \(200 captions\)")
    assert re.fullmatch(pattern, line), line


def test_reports_by_two_judges_do_not_compare():
    a = {"judge": {"content_id": "sha256:aa"}, "emoji_fid": 20.0, "prompt_accuracy": 0.3}
    b = {"judge": {"content_id": "sha256:aa"}, "emoji_fid": 25.0, "prompt_accuracy": 0.2}
    assert ratio(a, b, "emoji_fid") == 0.8
    with pytest.raises(UserError, match=r"different judges \(ours: sha256:aa, theirs: sha256:bb\)"):
        ratio(a, {**b, "judge": {"content_id": "sha256:bb"}}, "emoji_fid")
    with pytest.raises(UserError, match="before has no judge content id"):
        same_judge(after=a, before={"judge": {"uri": "/old/judge"}})


def test_samples_per_caption_is_checked():
    assert EvalConfig(data="/lat", real=True).samples_per_caption == 4
    with pytest.raises(UserError, match="--samples-per-caption must be 1..64, got 0"):
        EvalConfig(data="/lat", real=True, samples_per_caption=0)


def test_caption_retrieval_matches_words_not_the_template():
    """A batch's best training match per held-out caption: by the words that are not the captions' template,
    training-split rows only, ties to the smaller content id."""
    from emoji_ldm.eval.retrieval import _best_batch, template_words, words
    from emoji_ldm.store.splits import split_of

    held_out = ["red heart emoji, on a transparent background", "cat face emoji, on a transparent background",
                "pizza emoji, on a transparent background"]
    common = template_words(held_out)
    assert common == words("emoji on a transparent background")
    train_ids = [f"{i:08x}" + "0" * 24 for i in range(100) if split_of(f"{i:08x}" + "0" * 24) == "train"]
    assert split_of("0" * 32) == "val"
    batch = {"id": ["0" * 32, train_ids[3], train_ids[2], train_ids[1]],
             "caption": ["red heart emoji", "blue heart emoji", "heart emoji", "grinning cat face emoji"],
             "title": [None] * 4, "image": [b"val", b"blue", b"heart", b"cat"]}
    best = _best_batch(batch, [words(c) - common for c in held_out], common)
    assert best["query"].tolist() == [0, 1]  # nothing shares a word with "pizza"
    # "red heart": the val row is never a match; "heart" (1/2) beats "blue heart" (1/3)
    assert best["image"].tolist() == [b"heart", b"cat"] and best["score"].tolist() == [0.5, 2 / 3]
