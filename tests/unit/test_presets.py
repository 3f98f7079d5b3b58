"""Presets, overrides and training-config validation."""

import pytest

from emoji_ldm.config import parse_pairs
from emoji_ldm.errors import UserError
from emoji_ldm.inference.generate import GenerateConfig
from emoji_ldm.inference.settings import SamplerSettings
from emoji_ldm.models.builders import build_unet, count_params, sampling_scheduler
from emoji_ldm.models.presets import PRESETS, get_preset, preset_from_dict
from emoji_ldm.train.ldm import TrainConfig


def parse_sets(items):
    return parse_pairs(items, "--set")


def test_presets_round_trip_and_overrides():
    for preset in PRESETS.values():
        assert preset_from_dict(preset.to_dict()) == preset
    p = get_preset("tiny", parse_sets(["train.max_steps=7", "unet.block_out_channels=32,64", "image_size=64",
                                       "vae.scaling_factor=0.5", "unet.finetune=lora", "unet.pretrained=/sd"]))
    assert p.train.max_steps == 7 and p.unet.block_out_channels == (32, 64) and p.image_size == 64
    assert p.vae.scaling_factor == 0.5 and p.unet.finetune == "lora"
    assert get_preset("emoji64").vae.scaling_factor == 0.18215
    three = get_preset("tiny", parse_sets(["unet.block_out_channels=32,64,64",  # levels change: validated together
                                           "unet.down_block_types=DownBlock2D,CrossAttnDownBlock2D,DownBlock2D",
                                           "unet.up_block_types=UpBlock2D,CrossAttnUpBlock2D,UpBlock2D"]))
    assert len(three.unet.down_block_types) == 3
    for written in ("[32, 64]", "(32,64)", " 32, 64 "):  # a list as people write one
        preset = get_preset("tiny", parse_sets([f"unet.block_out_channels={written}"]))
        assert preset.unet.block_out_channels == (32, 64)
    assert get_preset("emoji64").noise.beta_schedule == "scaled_linear"
    pixels = get_preset("pixel32").noise  # pixel space: DDPM's linear betas
    assert (pixels.beta_schedule, pixels.beta_start, pixels.beta_end) == ("linear", 0.0001, 0.02)


@pytest.mark.parametrize("name, sets, text", [
    ("nope", [], "unknown preset 'nope'"),
    ("tiny", ["train.nope=1"], "unknown preset field 'train.nope'"),
    ("tiny", ["bogus.x=1"], "unknown preset section 'bogus'"),
    ("tiny", ["train.max_steps=abc"], "bad value for 'train.max_steps'"),
    ("tiny", ["unet.finetune=half"], "full, attn2 or lora"),
    ("tiny", ["image_size=30"], "multiple of 8"),
    ("tiny", ["train.caption_dropout=1.5"], "caption_dropout"),
    ("tiny", ["unet.block_out_channels=32,64,64"], "down_block_types has 2 entries"),
    ("tiny", ["unet.block_out_channels=[32,x64]"], r"'\[32,x64\]' is not a list of whole numbers .*\('x64' is not\)"),
    ("tiny", ["vae.colour_loss=visible"], "vae.colour_loss must be premultiplied or straight, got 'visible'"),
    ("tiny", ["vae.kind=pixels"], "vae.kind must be kl or patches, got 'pixels'"),
    ("tiny", ["train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3, got 4"),
    ("tiny", ["train.precision=fp8"], "train.precision must be one of auto, bf16, fp16, no, got 'fp8'"),
    ("tiny", ["train.gpu_micro_batch=0"], "train.gpu_micro_batch must be positive or None, got 0"),
    ("pixel32", ["vae.patch_size=4"], r"latent_channels must be channels x patch_size\^2 = 64, got 16"),
    ("pixel32", ["vae.pretrained=stabilityai/sd-vae-ft-mse"], "vae.kind=patches has no autoencoder to load"),
    ("pixel32", ["image_size=24", "vae.patch_size=16", "vae.latent_channels=1024"],
     "image_size 24 is not a multiple of vae.patch_size 16"),
])
def test_bad_presets(name, sets, text):
    with pytest.raises(UserError, match=text):
        get_preset(name, parse_sets(sets))


def test_parse_sets_needs_equals():
    with pytest.raises(UserError, match="--set 'train.max_steps' is not NAME=VALUE"):
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


@pytest.mark.parametrize("kwargs, text", [
    ({"count": 0}, "sampler setting count must be a whole number from 1 to 64, got 0"),
    ({"steps": 0}, "sampler setting steps must be a whole number from 1 to 1000, got 0"),
    ({"guidance": -1.0}, "sampler setting guidance must be from 0 to 30, got -1.0"),
    ({"scheduler": "euler"}, "sampler setting scheduler must be one of dpmpp, ddim, ddpm, got 'euler'"),
    ({"seed": -1}, "sampler setting seed must be a whole number from 0 to 4294967295, got -1"),
    ({"size": 30}, "sampler setting size must be a multiple of 8"),
])
def test_sampler_settings_errors(kwargs, text):
    with pytest.raises(UserError, match=text):
        SamplerSettings(**kwargs)


def test_generate_config_errors():
    with pytest.raises(UserError, match="empty"):
        GenerateConfig(model="/m", prompt=" ", out="/o")
    with pytest.raises(UserError, match="unknown scheduler"):
        sampling_scheduler("euler", {})


@pytest.mark.parametrize("name", ["dpmpp", "ddim", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_every_sampler_ends_at_the_clean_image_a_model_predicts(name, prediction_type):
    """A model that always predicts the same clean image x0 (outside [-1, 1], as latents and a guided pixel model's
    predictions are) is sampled to exactly x0 by each sampler. DDIM and DDPM clipped x0 to [-1, 1] (their
    `clip_sample` default) and drew something else; DDIM mixed the clipped image with the unclipped one's noise."""
    import torch

    from emoji_ldm.models.builders import noise_scheduler

    training = noise_scheduler(get_preset("pixel32", {"noise.prediction_type": prediction_type}))
    assert training.config.clip_sample  # what a saved model's scheduler config says
    sampler = sampling_scheduler(name, training.config)
    x0 = torch.linspace(-2.5, 2.5, 2 * 64 * 8 * 8).reshape(2, 64, 8, 8)  # (B, C, h, w)
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sampler.set_timesteps(10)
    for t in sampler.timesteps:
        a = sampler.alphas_cumprod[t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise that x0 implies at x_t
        out = {"sample": x0, "epsilon": eps}[prediction_type]
        x = sampler.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.allclose(x, x0, atol=1e-3), (name, prediction_type, float((x - x0).abs().max()))


def test_emoji64_unet_matches_the_seed():
    unet = build_unet(get_preset("emoji64"))  # text.hidden_size 512 (CLIP ViT-B/32): no hub config needed
    assert unet.config.cross_attention_dim == 512 and 70e6 < count_params(unet) < 74e6


def test_small64_is_the_size_the_readme_says():
    preset = get_preset("small64")
    assert preset.latent_size == 16 and 15e6 < count_params(build_unet(preset)) < 20e6


def test_each_preset_states_its_engine():
    """DDP (ZeRO 0) where the model fits one GPU; ZeRO 2 for the SD fine-tune, whose fp32 masters and AdamW state
    it partitions. The GPU presets state a compute-bound batch per GPU and bf16."""
    assert {name: p.train.zero_stage for name, p in PRESETS.items()} == {
        "tiny": 0, "pixel32": 0, "small64": 0, "emoji64": 0, "sd-finetune": 2}
    assert (PRESETS["emoji64"].train.gpu_micro_batch, PRESETS["emoji64"].train.precision) == (1024, "bf16")
    assert (PRESETS["sd-finetune"].train.gpu_micro_batch, PRESETS["sd-finetune"].train.precision) == (8, "bf16")


def test_train_takes_its_engine_batch_and_precision_from_the_preset():
    """`--zero-stage` defaults to the preset's; with --gpu the global batch is the preset's batch per GPU x workers
    and --precision auto is the preset's; what the command line gives wins."""
    assert TrainConfig(data="/x", out="/y").zero_stage == 0
    assert TrainConfig(data="/x", out="/y", preset="sd-finetune").zero_stage == 2
    assert TrainConfig(data="/x", out="/y", zero_stage=3).resolved_preset().train.zero_stage == 3
    cpu = TrainConfig(data="/x", out="/y", preset="emoji64", workers=4)
    assert cpu.resolved_preset().train.batch_size == 128 and cpu.speed.precision == "auto"
    gpu = TrainConfig(data="/x", out="/y", preset="emoji64", workers=4, use_gpu=True)
    assert gpu.resolved_preset().train.batch_size == 4096 and gpu.speed.precision == "bf16"
    assert TrainConfig(data="/x", out="/y", preset="emoji64", workers=4, use_gpu=True,
                       batch_size=256).resolved_preset().train.batch_size == 256
    assert TrainConfig(data="/x", out="/y", preset="emoji64", use_gpu=True,
                       overrides={"train.batch_size": "64"}).resolved_preset().train.batch_size == 64
