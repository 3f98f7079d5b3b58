"""A job larger than the batch size (bulk's --per-prompt above --batch-size) is drawn in calls of at most that
many images, and the split changes no image."""

from __future__ import annotations

from emoji_ldm.inference.sampler import SampleJob, Sampler
from tests.tiny_models import tiny_sd_pipeline


def test_jobs_are_split_into_calls_of_at_most_max_batch(tmp_path):
    sampler = Sampler.load(str(tiny_sd_pipeline(tmp_path / "sd")))
    jobs = [SampleJob(("a cat",) * 5, tuple(range(5)), "", 2, 3.0), SampleJob(("a dog",), (9,), "", 2, 3.0)]
    whole = sampler.sample(jobs)
    sizes = []
    original = sampler._call
    sampler._call = lambda part: sizes.append(sum(len(j.prompts) for j in part)) or original(part)
    split = sampler.sample(jobs, max_batch=2)
    assert sizes == [2, 2, 2] and [len(images) for images in split] == [5, 1]
    pixels = lambda result: [[im.tobytes() for im in images] for images in result]
    assert pixels(split) == pixels(whole)
