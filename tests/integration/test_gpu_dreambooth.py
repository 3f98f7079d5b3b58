"""DreamBooth's export under what a GPU run uses, on CPU: DeepSpeed bf16 (frozen weights must come out exactly as
the base had them) and a LoRA on a BERT-family text encoder (MiniLM, the tiny presets' encoder), which diffusers
loads only with the adapter metadata saved beside the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emoji_ldm.inference.sampler import SampleJob, Sampler
from emoji_ldm.train.dreambooth import DreamBoothConfig, dreambooth
from emoji_ldm.train.speed import SpeedOptions
from tests.tiny_models import tiny_sd_pipeline, tiny_sd_vae


def minilm_pipeline(folder):
    """A tiny SD-layout pipeline whose text encoder is the pretrained MiniLM (BERT, 384-d), as the tiny presets'."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, BertModel

    from emoji_ldm.models.builders import minilm_path

    tiny_sd_vae(folder.parent / "minilm-vae")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384,
                                attention_head_dim=4)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder.parent / "minilm-vae"),
        text_encoder=BertModel.from_pretrained(minilm_path(), add_pooling_layer=False),
        tokenizer=AutoTokenizer.from_pretrained(minilm_path()), unet=unet,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-dreambooth")
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        image = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(150, 255, 3)))
        image.paste((30, 30, 220), (6, 6, 26, 26))
        image.save(folder / f"photo-{i}.png")
    return root, folder


def _config(root, base, photos, out, **kwargs):
    return DreamBoothConfig(**{**dict(base=str(base), instance_data=f"dir:{photos}", instance_prompt="a sks dog emoji",
                                      class_prompt="a dog emoji", out=str(root / out), prior_loss_weight=0.0,
                                      num_class_images=0, max_steps=2, checkpoint_every=2, log_every=1), **kwargs})


def test_bf16_export_keeps_frozen_weights_exact(photos):
    """After a bf16 run the exported frozen text encoder equals the base bit for bit, and the trained UNet is
    exported in fp32 from the optimizer's masters."""
    from diffusers import StableDiffusionPipeline

    root, folder = photos
    base = tiny_sd_pipeline(root / "sd")
    dreambooth(_config(root, base, folder, "bf16", speed=SpeedOptions(precision="bf16"), lr=1e-2))
    out = StableDiffusionPipeline.from_pretrained(root / "bf16" / "model", safety_checker=None)
    ref = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    for name, value in ref.text_encoder.state_dict().items():
        assert torch.equal(out.text_encoder.state_dict()[name], value), name
    assert {p.dtype for p in out.unet.parameters()} == {torch.float32}
    assert not torch.equal(out.unet.conv_in.weight, ref.unet.conv_in.weight)
    assert torch.equal(out.vae.decoder.conv_out.weight, ref.vae.decoder.conv_out.weight)


def test_lora_on_a_minilm_text_encoder_loads_as_an_adapter(photos):
    """LoRA on the UNet and a BERT (MiniLM) text encoder: the adapter loads on the base as `serve --adapter` does,
    changes what is drawn, and the fused model draws as `generate` does."""
    root, folder = photos
    base = minilm_pipeline(root / "minilm")
    card = dreambooth(_config(root, base, folder, "lora", method="lora", train_text_encoder=True, lr=5e-2))
    assert card["lora"]["uri"].endswith("lora")

    sampler = Sampler.load(str(base))
    job = SampleJob(("a sks dog emoji",), (0,), "", 2, 3.0)
    (plain,) = sampler.pngs([job])[0]
    sampler.load_adapter("me", str(root / "lora"))
    (adapted,) = sampler.pngs([SampleJob(("a sks dog emoji",), (0,), "", 2, 3.0, adapter="me")])[0]
    assert plain[0] != adapted[0]
    (fused,) = Sampler.load(str(root / "lora" / "model")).pngs([job])[0]
    assert fused[0].startswith(b"\x89PNG")
