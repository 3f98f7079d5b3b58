"""Presets, overrides and training-config validation."""

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.generate import GenerateConfig
from emoji_ldm.models.builders import count_params, sampling_scheduler
from emoji_ldm.models.presets import PRESETS, get_preset, parse_sets, preset_from_dict, with_overrides
from emoji_ldm.train.ldm import TrainConfig


def test_presets_round_trip_and_overrides():
    for preset in PRESETS.values():
        assert preset_from_dict(preset.to_dict()) == preset
    p = get_preset("tiny", parse_sets(["train.max_steps=7", "unet.block_out_channels=32,64", "image_size=64",
                                       "vae.scaling_factor=0.5", "unet.finetune=lora"]))
    assert p.train.max_steps == 7 and p.unet.block_out_channels == (32, 64) and p.image_size == 64
    assert p.vae.scaling_factor == 0.5 and p.unet.finetune == "lora"
    assert get_preset("emoji64").vae.scaling_factor == 0.18215
    assert get_preset("emoji64").noise.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("name, sets, text", [
    ("nope", [], "unknown preset 'nope'"),
    ("tiny", ["train.nope=1"], "unknown preset field 'train.nope'"),
    ("tiny", ["bogus.x=1"], "unknown preset section 'bogus'"),
    ("tiny", ["train.max_steps=abc"], "bad value for 'train.max_steps'"),
    ("tiny", ["unet.finetune=half"], "full, attn2 or lora"),
    ("tiny", ["image_size=30"], "multiple of 8"),
    ("tiny", ["train.caption_dropout=1.5"], "caption_dropout"),
])
def test_bad_presets(name, sets, text):
    with pytest.raises(UserError, match=text):
        get_preset(name, parse_sets(sets))


def test_parse_sets_needs_equals():
    with pytest.raises(UserError, match="section.field=value"):
        parse_sets(["train.max_steps"])


@pytest.mark.parametrize("kwargs, text", [
    ({"zero_stage": 4}, "--zero-stage must be 0, 1, 2 or 3, got 4"),
    ({"workers": 3, "batch_size": 64}, "not divisible by workers x grad_accum = 3 x 1"),
    ({"max_steps": 5, "epochs": 1.0}, "not both"),
    ({"workers": 0}, "--workers must be positive"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
])
def test_train_config_errors(kwargs, text):
    with pytest.raises(UserError, match=text):
        TrainConfig(data="/x", out="/y", **kwargs)


def test_generate_config_errors():
    for kwargs, text in [({"n": 0}, "--n must be"), ({"steps": 0}, "--steps"), ({"guidance": -1}, "--guidance"),
                         ({"scheduler": "euler"}, "unknown scheduler 'euler'"), ({"prompt": " "}, "empty")]:
        with pytest.raises(UserError, match=text):
            GenerateConfig(**{"model": "/m", "prompt": "x", "out": "/o", **kwargs})
    with pytest.raises(UserError, match="unknown scheduler"):
        sampling_scheduler("euler", {})


def test_emoji64_unet_matches_the_seed():
    from diffusers import UNet2DConditionModel

    spec = with_overrides(get_preset("emoji64"), {}).unet
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=spec.block_out_channels,
                                layers_per_block=spec.layers_per_block, down_block_types=spec.down_block_types,
                                up_block_types=spec.up_block_types, cross_attention_dim=512,
                                attention_head_dim=spec.attention_head_dim)
    assert 70e6 < count_params(unet) < 74e6
