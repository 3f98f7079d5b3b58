"""Fast tests of logic that otherwise runs only inside long integration tests."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from emoji_ldm.caption.prompt import clean_caption
from emoji_ldm.errors import UserError
from emoji_ldm.generate import SampleJob
from emoji_ldm.ingest.build import _decide
from emoji_ldm.models.presets import get_preset
from emoji_ldm.sampling import SamplerSettings
from emoji_ldm.train.ldm import TrainConfig, _check_resume, _lr_lambda


def test_build_keeps_the_first_of_each_id_and_counts_the_rest():
    meta = pa.table({
        "_key": [3, 0, 1, 2, 4, 5],
        "id": ["b", "a", "a", None, "old", "c"],
        "_reason": [None, None, None, "corrupt", None, None],
        "_detail": [None, None, None, "cannot identify image", None, None],
        "source_url": ["u3", "u0", "u1", "u2", "u4", "u5"],
    })
    keep, rejected, dup_build, dup_table, rejects = _decide(meta, existing={"old"})
    assert keep.tolist() == [0, 3, 5]  # in key order: the first "a" wins
    assert rejected == {"corrupt": 1} and dup_build == 1 and dup_table == 1
    assert rejects.to_pylist() == [{"source_url": "u2", "reason": "corrupt", "detail": "cannot identify image"}]


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    preset = get_preset("tiny", {"train.lr": 1e-3, "train.min_lr": 1e-4, "train.warmup_steps": 10,
                                 "train.max_steps": 110})
    f = _lr_lambda(preset)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # floor = min_lr / lr


def test_resume_refuses_another_model_or_another_world():
    preset = get_preset("tiny")
    state = {"preset": preset.to_dict(), "world_size": 2, "zero_stage": 2}
    config = TrainConfig(data="/d", out="/o")
    _check_resume(state, preset, config)  # same everything: fine
    _check_resume(state, get_preset("tiny", {"train.lr": 1.0}), config)  # the optimiser recipe may change
    with pytest.raises(UserError, match="different unet config"):
        _check_resume(state, get_preset("tiny", {"unet.layers_per_block": 2}), config)
    with pytest.raises(UserError, match="--workers 2 --zero-stage 2"):
        _check_resume(state, preset, TrainConfig(data="/d", out="/o", workers=1, overrides={"train.batch_size": 63}))


def test_sample_job_splits_keep_each_image_with_its_seed():
    job = SampleJob.of(("a", "b", "c", "d", "e"), (10, 11, 12, 13, 14), SamplerSettings(steps=7, size=64))
    pieces = job.split(2)
    assert [p.prompts for p in pieces] == [("a", "b"), ("c", "d"), ("e",)]
    assert [p.seeds for p in pieces] == [(10, 11), (12, 13), (14,)]
    assert all(p.settings == (7, 5.0, "dpmpp", 64) for p in pieces)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        SampleJob(("a", "b"), (1,))


@pytest.mark.parametrize("raw, clean", [
    ("<|im_start|>assistant\nA red heart.<|im_end|>", "A red heart."),
    ('  "a smiling\n cat face"  ', "a smiling cat face"),
    ("`pizza slice`", "pizza slice"),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_caption_cuts_at_a_word():
    text = clean_caption("word " * 100, limit=23)
    assert text == "word word word word" and len(text) <= 23
