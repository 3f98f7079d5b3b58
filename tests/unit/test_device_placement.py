"""Tensors follow the model's device, and evaluation measures the objective the model was trained on.

CUDA is not here: the `meta` device stands in for "a device other than the CPU the tokenizer makes its tensors
on", with a text model that, like a CUDA model, refuses inputs on another device."""

from __future__ import annotations

import types

import torch

from emoji_ldm.models.builders import encode_text, load_text_encoder
from emoji_ldm.models.presets import get_preset


class DeviceStrictEncoder(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(width, device="meta"))
        self.config = types.SimpleNamespace(use_attention_mask=True)

    def forward(self, input_ids, attention_mask=None):
        for t in (input_ids, attention_mask):
            if t.device != self.weight.device:
                raise RuntimeError(f"input on {t.device}, model on {self.weight.device}")
        return (torch.zeros(*input_ids.shape, len(self.weight), device=self.weight.device),)


def test_encode_text_feeds_the_model_on_its_own_device():
    tokenizer, _ = load_text_encoder(get_preset("tiny"))
    hidden, mask, truncated = encode_text(tokenizer, DeviceStrictEncoder(8), ["a cat", "a dog"], 16)
    assert hidden.device.type == "meta" and tuple(hidden.shape) == (2, 16, 8)
    assert mask.device.type == "meta" and truncated == 0


def test_heldout_loss_of_a_v_prediction_model_is_against_the_velocity():
    """A model that always predicts 0, on all-zero latents: its loss is E[target^2]. The velocity of x0 = 0 is
    sqrt(alpha_bar_t) * eps, so a v-prediction model's loss is mean_t(alpha_bar_t) times the epsilon model's."""
    from diffusers import DDPMScheduler

    from emoji_ldm.eval.scores import TIMESTEPS, heldout_loss

    def zero_unet(x, t, encoder_hidden_states):
        return types.SimpleNamespace(sample=torch.zeros_like(x))

    latents, text = torch.zeros(6, 4, 8, 8), torch.zeros(6, 3, 8)
    eps_model = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    v_model = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction")
    ratio = heldout_loss(zero_unet, v_model, latents, text) / heldout_loss(zero_unet, eps_model, latents, text)
    expected = float(v_model.alphas_cumprod[list(TIMESTEPS)].mean())
    assert abs(ratio - expected) < 1e-4


def test_generate_and_eval_take_gpu_and_refuse_it_without_cuda():
    import pytest

    from emoji_ldm.cli.commands import find, parse_config
    from emoji_ldm.errors import UserError
    from emoji_ldm.inference.sampler import inference_device

    generate = parse_config(find(("generate",)), ["--model", "m", "--prompt", "cat", "--out", "o", "--gpu"])
    evaluate = parse_config(find(("eval",)), ["--data", "d", "--model", "m", "--gpu"])
    assert generate.use_gpu and evaluate.use_gpu
    assert inference_device(False) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--gpu: no CUDA device is visible here"):
            inference_device(True)


def test_serve_gpus_reach_the_replicas_and_a_visible_gpu_is_named():
    from emoji_ldm.serve.placement import generator_resources

    deployments = [{"name": "Generator", "ray_actor_options": {"num_cpus": 1}}, {"name": "Ingress"}]
    placed, note = generator_resources(deployments, 1, cluster_gpus=4)
    assert placed[0]["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1} and note is None
    assert placed[1] == {"name": "Ingress"} and deployments[0]["ray_actor_options"] == {"num_cpus": 1}
    placed, note = generator_resources(deployments, 0, cluster_gpus=4)
    assert "num_gpus" not in placed[0]["ray_actor_options"] and "pass --gpus 1" in note
    assert generator_resources(deployments, 0, cluster_gpus=0)[1] is None


def test_compile_with_adapters_is_refused_in_one_line():
    import pytest

    from emoji_ldm.errors import UserError
    from emoji_ldm.serve.app import AppArgs

    with pytest.raises(UserError, match="args.compile with LoRA adapters"):
        AppArgs(model="/m", compile=True, adapters={"me": "/lora"})
    AppArgs(model="/m", compile=True)  # either alone is fine
    AppArgs(model="/m", adapters={"me": "/lora"})
