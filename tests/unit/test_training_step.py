"""The training step without Ray: the loss targets by prediction type, a real step, the step check."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from emoji_ldm.cli.commands import STAGES, find, parse_config
from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import get_preset
from emoji_ldm.train.step import diffusion_target


def test_targets_follow_the_prediction_type():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(diffusion_target(sched, x0, eps, t, "epsilon"), eps)
    alpha_bar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0  # by hand: v = sqrt(a) eps - sqrt(1 - a) x0
    assert torch.allclose(diffusion_target(sched, x0, eps, t, "v_prediction"), v, atol=1e-6)
    assert torch.equal(diffusion_target(sched, x0, eps, t, "sample"), x0)  # the clean image (pixel32)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(sched, x0, eps, t, "x0")
    with pytest.raises(UserError, match="noise.prediction_type must be one of epsilon, v_prediction, sample, "
                                        "got 'x0'"):
        get_preset("tiny", {"noise.prediction_type": "x0"})


def test_step_check_runs_the_real_step():
    from emoji_ldm.train.check import report, step_check

    config = parse_config(find(("train-step-check",)), ["--preset", "tiny", "--steps", "1", "--warmup", "0",
                                                         "--batch-size", "2", "--set", "unet.block_out_channels=32,32",
                                                         "--set", "noise.prediction_type=v_prediction"])
    result = step_check(config)
    assert result["images_per_s"] > 0 and result["flops_per_step"] > 0 and 0 < result["mfu"] < 5
    assert "train-step-check: preset tiny on cpu" in report(result)
    assert "train" in STAGES  # the step check is no stage: it needs no cluster
    fast = step_check(parse_config(find(("train-step-check",)), [
        "--steps", "1", "--warmup", "0", "--batch-size", "2", "--set", "unet.block_out_channels=32,32",
        "--precision", "bf16", "--channels-last", "--gradient-checkpointing", "--allow-tf32",
        "--sample-batch", "2", "--sample-steps", "2"]))  # on CPU
    assert fast["precision"] == "bf16 autocast" and fast["loss"] == fast["loss"]  # a number, not NaN
    assert fast["sampling"]["images_per_s"] > 0 and "sampler (DPM-Solver++ 2 steps" in report(fast)
    assert fast["speed"] == "precision bf16, allow_tf32, gradient_checkpointing, channels_last"
    with pytest.raises(UserError, match="--precision fp16 needs a GPU"):
        step_check(parse_config(find(("train-step-check",)), ["--precision", "fp16"]))


def test_step_check_compiles_the_unet(monkeypatch):
    """torch.compile of the UNet inside the real step: one compiled step. Dynamo traces it as inductor would, with
    the aot_eager backend, which builds no C++: inductor's CPU kernels cost a minute of C++ builds on 2 cores (the
    suite's slowest unit test), and are torch's own to get right. `make gpu-check` compiles with inductor (triton
    on the GPU; `DEVICE=cpu` builds the C++ kernels)."""
    import torch._dynamo

    from emoji_ldm.train.check import step_check

    torch._dynamo.utils.counters.clear()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, **{**kwargs, "backend": "aot_eager"}))
    # one UNet level (cross-attention, the mid block)
    result = step_check(parse_config(find(("train-step-check",)), [
        "--steps", "1", "--warmup", "1", "--batch-size", "2", "--set", "unet.block_out_channels=32",
        "--set", "unet.down_block_types=CrossAttnDownBlock2D", "--set", "unet.up_block_types=CrossAttnUpBlock2D",
        "--set", "unet.layers_per_block=1", "--compile", "--sample-batch", "0"]))
    assert result["speed"] == "precision no, compile (default)" and result["loss"] == result["loss"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile


def test_compile_without_a_compiler_is_one_clear_line(monkeypatch, capsys):
    """--compile where inductor cannot build: one line from the CLI before any compile, not inductor's error from
    the first step; the same for a served or bulk pipeline before its weights load."""
    from emoji_ldm.cli.main import main
    from emoji_ldm.inference.sampler import InferenceOptions, load_pipeline

    monkeypatch.setenv("CXX", "no-such-c++")
    assert main(["train-step-check", "--steps", "1", "--batch-size", "2", "--set", "unet.block_out_channels=32,32",
                 "--compile", "--sample-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["emoji-ldm: error: --compile on CPU needs a C++ compiler for inductor's kernels: CXX='no-such-c++' "
                   "is not on PATH; install one (apt-get install g++; `make test` does), or drop --compile"]
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="no g\\+\\+, c\\+\\+ or clang\\+\\+ on PATH"):
        load_pipeline("/no/model/needed", options=InferenceOptions(compile=True))


def test_unet_attention_is_sdpa():
    from diffusers.models.attention_processor import AttnProcessor

    from emoji_ldm.models.builders import build_unet
    from emoji_ldm.train.speed import check_sdpa, prepare_unet

    unet = build_unet(get_preset("tiny", {"unet.block_out_channels": "32,32"}))
    check_sdpa(unet)  # diffusers' default with torch 2
    unet = prepare_unet(unet, parse_config(find(("train-step-check",)), ["--channels-last"]).speed)
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    unet.set_attn_processor(AttnProcessor())  # the slow path: refused, not assumed away
    with pytest.raises(RuntimeError, match="does not use scaled_dot_product_attention"):
        check_sdpa(unet)


def _sched(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighting_matches_the_formula(prediction_type):
    from emoji_ldm.train.step import diffusion_loss

    sched = _sched(prediction_type)
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([10, 200, 600, 990])
    plain = diffusion_loss(pred, target, t, sched, prediction_type, None)
    assert torch.allclose(plain, ((pred - target) ** 2).mean())
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)  # by hand: SNR(t) = a / (1 - a)
    gamma = 5.0
    weight = torch.minimum(snr, torch.full_like(snr, gamma)) / {"epsilon": snr, "v_prediction": snr + 1,
                                                                "sample": torch.ones_like(snr)}[prediction_type]
    by_hand = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
    weighted = diffusion_loss(pred, target, t, sched, prediction_type, gamma)
    assert torch.allclose(weighted, by_hand, atol=1e-6)
    assert not torch.allclose(weighted, plain)  # the option changes the loss
    # low t (high SNR) is down-weighted for epsilon: weight gamma / SNR < 1
    assert prediction_type != "epsilon" or weight[0] < 0.1


def test_noise_offset_shifts_each_channel_by_one_shared_draw():
    from emoji_ldm.train.step import sample_noise

    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(0)
    plain = sample_noise(latents, 0.0)
    torch.manual_seed(0)
    offset = sample_noise(latents, 0.1)
    torch.manual_seed(0)
    base = torch.randn_like(latents)
    extra = torch.randn(2, 4, 1, 1)  # by hand: the same draws in the same order
    assert torch.equal(plain, base)
    assert torch.allclose(offset, base + 0.1 * extra)
    diff = offset - plain  # one value per image and channel, the same at every pixel
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff), atol=1e-6)


def test_ema_warmup_follows_diffusers_schedule():
    from emoji_ldm.train.ema import make_ema

    params = [torch.nn.Parameter(torch.zeros(3))]
    spec = get_preset("tiny", {"train.ema_decay": 0.999}).train
    warm = get_preset("tiny", {"train.ema_decay": 0.999, "train.ema_warmup": "true", "train.ema_power": 0.75}).train
    plain_ema, warm_ema = make_ema(params, spec), make_ema(params, warm)
    for step in (10, 100, 1000):
        assert plain_ema.get_decay(step) == pytest.approx(min((1 + step - 1) / (10 + step - 1), 0.999))
        assert warm_ema.get_decay(step) == pytest.approx(min(1 - (1 + step - 1) ** -0.75, 0.999))
    # the EMA follows the weights with that decay: after one update from 0 towards 1
    params[0].data.fill_(1.0)
    warm_ema.optimization_step = 99
    warm_ema.step(params)
    d = 1 - (1 + 99) ** -0.75
    assert torch.allclose(warm_ema.shadow_params[0], torch.full((3,), 1 - d))


def test_recipe_options_are_validated():
    for key, value, message in [("train.snr_gamma", "0", "snr_gamma must be positive"),
                                ("train.noise_offset", "2", "noise_offset must be in"),
                                ("train.ema_power", "0", "ema_power must be in"),
                                ("train.adam_beta2", "1", r"train.adam_beta2 must be in \(0, 1\) .*got 1.0")]:
        with pytest.raises(UserError, match=message):
            get_preset("tiny", {key: value})


def test_timesteps_uniform_or_logit_normal():
    """Uniform draws are torch.randint's, as before (a resumed run draws what it drew); logit-normal ones (SD3's,
    t/T = sigmoid(N(0, 1))) crowd the middle of the schedule and leave its ends, and repeat under a seed."""
    from emoji_ldm.train.step import sample_timesteps

    uniform, logit = get_preset("pixel32").train, get_preset("pixel32", {"train.timesteps": "logit-normal"}).train
    torch.manual_seed(3)
    drawn = sample_timesteps(uniform, 1000, 5, "cpu")
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randint(0, 1000, (5,)))
    torch.manual_seed(3)
    t = sample_timesteps(logit, 1000, 20000, "cpu")  # (20000,)
    torch.manual_seed(3)
    assert torch.equal(t, sample_timesteps(logit, 1000, 20000, "cpu")) and t.dtype == torch.int64
    assert 0 <= t.min() and t.max() <= 999 and 450 <= t.float().median() <= 550
    ends = ((t < 100) | (t >= 900)).float().mean()  # uniform: 20%; logit-normal(0, 1): about 3%
    assert ends < 0.05
    with pytest.raises(UserError, match="train.timesteps must be one of uniform, stratified, logit-normal, got 'logn"):
        get_preset("pixel32", {"train.timesteps": "lognormal"})
    with pytest.raises(UserError, match="timestep_logit_std must be positive, got 0.0"):
        get_preset("pixel32", {"train.timesteps": "logit-normal", "train.timestep_logit_std": "0"})


def test_timesteps_stratified():
    """Stratified draws put one timestep in each of the micro-batch's n equal strata of the schedule, in a random
    order, and repeat under a seed."""
    from emoji_ldm.train.step import sample_timesteps

    recipe = get_preset("pixel32", {"train.timesteps": "stratified"}).train
    for n in (1, 8, 40):  # sizes that divide the 1,000 timesteps into whole strata
        torch.manual_seed(n)
        t = sample_timesteps(recipe, 1000, n, "cpu")  # (n,)
        torch.manual_seed(n)
        assert torch.equal(t, sample_timesteps(recipe, 1000, n, "cpu")) and t.dtype == torch.int64
        assert 0 <= t.min() and t.max() <= 999
        assert torch.equal(torch.sort(t * n // 1000).values, torch.arange(n))  # one draw in each stratum
    torch.manual_seed(0)
    t = sample_timesteps(recipe, 1000, 32, "cpu")
    assert not torch.equal(t, torch.sort(t).values)  # shuffled: the first image is not always the least noisy


def test_training_step_uses_the_recipe():
    """The loop's step with snr_gamma and noise_offset on a tiny UNet in one process: a finite loss and a measured
    grad norm."""
    from emoji_ldm.models.builders import build_unet
    from emoji_ldm.train.loop import one_process
    from emoji_ldm.train.step import PlainEngine, grad_norm, micro_batch_loss

    preset = get_preset("tiny", {"unet.block_out_channels": "32,32", "train.snr_gamma": "5",
                                 "train.noise_offset": "0.1", "noise.prediction_type": "v_prediction"})
    unet = build_unet(preset)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    engine = PlainEngine(unet, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1.0, unet.parameters())
    latents = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 16, unet.config.cross_attention_dim)
    loop = one_process(engine, list(unet.parameters()), lambda micro: (micro_batch_loss(
        engine, _sched("v_prediction"), *micro, torch.zeros(16, text.shape[-1]), preset.train, "v_prediction",
        torch.float32), {}), micro=2, device="cpu")
    loss = loop.step((latents, text))
    assert torch.isfinite(loss) and grad_norm(engine) > 0


def test_each_image_trains_on_one_form_of_its_caption():
    """A latent table's text_emb (B, K, L, D) holds K forms of each caption (the caption, its name form): the step
    gives the UNet one of them per image, each form about as often, and never one of another image."""
    from types import SimpleNamespace

    from emoji_ldm.train.step import micro_batch_loss

    seen = []

    class Engine:
        def __call__(self, noisy, t, encoder_hidden_states):
            seen.append(encoder_hidden_states[:, 0, 0].clone())  # (B,): which form of which image
            return SimpleNamespace(sample=torch.zeros_like(noisy))

    recipe = SimpleNamespace(caption_dropout=0.0, noise_offset=0.0, snr_gamma=None, timesteps="uniform")
    images = torch.arange(8.0).view(8, 1, 1, 1)  # image b, form k: all (L, D) values 10 b + k
    text = (10 * images + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)).expand(8, 2, 3, 5).contiguous()  # (B, K, L, D)
    torch.manual_seed(0)
    for _ in range(50):
        micro_batch_loss(Engine(), _sched("epsilon"), torch.zeros(8, 4, 2, 2), text, torch.zeros(3, 5), recipe,
                         "epsilon", torch.float32)
    seen = torch.stack(seen)  # (steps, B)
    assert torch.equal(seen // 10, torch.arange(8.0).expand_as(seen))  # each image its own caption
    assert 0.35 < (seen % 10).mean() < 0.65  # form 0 or 1, half and half


def test_prior_preservation_loss_matches_diffusers():
    """train_dreambooth.py: MSE over the instance half + prior_loss_weight x MSE over the class half."""
    from emoji_ldm.train.dreambooth import prior_preservation_loss

    torch.manual_seed(0)
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    loss, instance, prior = prior_preservation_loss(pred, target, 2, 0.5)
    by_hand_instance = ((pred[:2] - target[:2]) ** 2).mean()
    by_hand_prior = ((pred[2:] - target[2:]) ** 2).mean()
    assert torch.allclose(instance, by_hand_instance) and torch.allclose(prior, by_hand_prior)
    assert torch.allclose(loss, by_hand_instance + 0.5 * by_hand_prior)
    alone, _, none = prior_preservation_loss(pred, target, 4, 1.0)  # no class rows: plain MSE
    assert torch.allclose(alone, ((pred - target) ** 2).mean()) and float(none) == 0.0


def test_dreambooth_options_are_checked():
    from emoji_ldm.train.dreambooth import DreamBoothConfig, class_word_warning

    ok = dict(base="/m", instance_data="dir:/p", instance_prompt="a sks cat emoji", class_prompt="a cat emoji",
              out="/o")
    assert DreamBoothConfig(**ok).learning_rate == 5e-6 and DreamBoothConfig(**ok, method="lora").learning_rate == 1e-4
    for bad, text in (({"lora_rank": 300}, "--lora-rank must be 1-256"), ({"method": "half"}, "--method"),
                      ({"class_prompt": "A sks cat emoji"}, "equals --instance-prompt"),
                      ({"num_class_images": 0}, "--prior-loss-weight 0"), ({"batch_size": 3}, "multiple of"),
                      ({"grad_accum": 2}, "multiple of --workers x --grad-accum = 2 x 2"),
                      ({"grad_accum": 0}, "--grad-accum must be positive")):
        with pytest.raises(UserError, match=text):
            DreamBoothConfig(**{**ok, **bad})
    assert DreamBoothConfig(**{**ok, "num_class_images": 0, "prior_loss_weight": 0}).prior is False
    assert DreamBoothConfig(**ok, batch_size=8, grad_accum=2).grad_accum == 2
    assert class_word_warning("a sks cat emoji", "a cat emoji") is None
    assert "class word 'dog'" in class_word_warning("a sks emoji", "a dog emoji")


def test_a_step_skipped_on_overflow_is_not_counted():
    """fp16's dynamic loss scaling skips a step whose gradients overflowed: the engine says so
    (`was_step_applied`, as DeepSpeed's does), and neither the weights nor the LR schedule move."""
    from emoji_ldm.train.runner import step_applied
    from emoji_ldm.train.step import PlainEngine

    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    engine = PlainEngine(layer, opt, schedule, 1.0, layer.parameters(), scaler=torch.amp.GradScaler("cpu"))
    before = layer.weight.detach().clone()
    engine.backward(engine(torch.ones(2, 4)).sum() * float("inf"))  # overflowed gradients
    engine.step()
    assert not step_applied(engine) and torch.equal(layer.weight, before) and schedule.last_epoch == 0
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    assert step_applied(engine) and not torch.equal(layer.weight, before) and schedule.last_epoch == 1
