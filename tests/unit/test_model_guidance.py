"""A model's own guidance: its card names the classifier-free guidance it draws best at (the preset's), and every
route that samples it without a guidance of the caller's draws at that value and records it."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from emoji_ldm.errors import UserError
from emoji_ldm.inference.pngmeta import read_params
from emoji_ldm.inference.sampler import SampleJob, Sampler
from emoji_ldm.inference.settings import DEFAULT_GUIDANCE, SamplerSettings, model_guidance
from emoji_ldm.models.presets import get_preset
from emoji_ldm.serve.schemas import GenerateRequest
from emoji_ldm.serve.sets import set_manifest
from tests.tiny_models import tiny_model_with_card


def png_guidance(png: bytes) -> float:
    return read_params(Image.open(io.BytesIO(png)).text)["guidance"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_model_with_card(tmp_path_factory.mktemp("guidance") / "model", guidance=2.5))


def test_the_card_names_the_guidance_and_a_card_without_one_gets_the_default():
    assert model_guidance({"guidance": 2.5}) == 2.5
    assert model_guidance({"guidance": 0}) == 0.0  # no guidance at all is a value, not "unset"
    assert model_guidance({}) == model_guidance({"guidance": None}) == DEFAULT_GUIDANCE == 5.0
    assert get_preset("pixel32").guidance == 2.5 and get_preset("tiny").guidance == DEFAULT_GUIDANCE
    assert get_preset("pixel32", {"guidance": "3"}).guidance == 3.0  # --set guidance=3
    with pytest.raises(UserError, match=r"guidance must be a number from 0 to 30 \(the sampler's limit\), got 31.0"):
        get_preset("pixel32", {"guidance": "31"})


def test_a_job_without_guidance_is_drawn_at_the_cards_and_its_pngs_say_so(model):
    sampler = Sampler.load(model)
    assert sampler.guidance == 2.5
    job = SampleJob.of(("red heart", "cat face"), (0, 1), SamplerSettings(steps=2))
    assert job.guidance is None and sampler.resolve(job).guidance == 2.5
    (own,), (explicit,), (other,) = (sampler.pngs([j]) for j in (
        job, SampleJob.of(job.prompts, job.seeds, SamplerSettings(steps=2, guidance=2.5)),
        SampleJob.of(job.prompts, job.seeds, SamplerSettings(steps=2, guidance=9.0))))
    assert [png_guidance(png) for png, _ in own] == [2.5, 2.5]
    assert [png for png, _ in own] == [png for png, _ in explicit]  # the same images as asking for 2.5
    assert [png_guidance(png) for png, _ in other] == [9.0, 9.0]  # a caller's guidance wins
    assert [p["guidance"] for _, p in other] == [9.0, 9.0]


def test_the_service_and_the_cli_leave_guidance_to_the_model_unless_given():
    assert SamplerSettings().guidance is None and SamplerSettings(guidance=3).guidance == 3.0
    assert SamplerSettings().with_model_guidance({"guidance": 2.5}).guidance == 2.5  # bulk's and eval's
    assert SamplerSettings(guidance=4).with_model_guidance({"guidance": 2.5}).guidance == 4.0
    assert GenerateRequest(prompt="red heart").sampler().guidance is None
    assert GenerateRequest(prompt="red heart", guidance=4).sampler().guidance == 4.0


def test_a_sets_manifest_records_the_guidance_it_was_drawn_at():
    settings = {"seed": 0, "steps": 25, "guidance": None, "scheduler": "dpmpp"}
    own = set_manifest("s1", "t", ["heart"], ["heart"], settings, {"guidance": 2.5}, "file:///m")
    given = set_manifest("s1", "t", ["heart"], ["heart"], {**settings, "guidance": 7.0}, {"guidance": 2.5},
                         "file:///m")
    old = set_manifest("s1", "t", ["heart"], ["heart"], settings, {}, "file:///m")
    assert (own["settings"]["guidance"], given["settings"]["guidance"], old["settings"]["guidance"]) == (
        2.5, 7.0, DEFAULT_GUIDANCE)
