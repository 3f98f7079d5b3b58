"""The pixel-space model's autoencoder (`vae.kind: patches`, the `pixel32` preset): exact, weightless, and a
component a saved pipeline loads again."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from emoji_ldm.models.builders import build_unet, build_vae, load_sd_pipeline
from emoji_ldm.models.patches import PatchAutoencoder
from emoji_ldm.models.presets import get_preset


def test_patches_round_trip_exactly_and_have_the_latent_shape_of_the_preset():
    preset = get_preset("pixel32")
    vae = build_vae(preset)
    assert isinstance(vae, PatchAutoencoder) and not preset.vae.trained_here
    x = torch.rand(3, 4, 32, 32) * 2 - 1  # (B, RGBA, H, W) in [-1, 1]
    z = vae.encode(x).latent_dist.mean
    assert z.shape == (3, preset.vae.latent_channels, preset.latent_size, preset.latent_size) == (3, 16, 16, 16)
    assert torch.equal(vae.encode(x).latent_dist.sample(), z)  # deterministic: no noise in the "posterior"
    assert torch.equal(vae.decode(z).sample, x)
    assert z[0, :4, 0, 0].tolist() == x[0, 0, :2, :2].flatten().tolist()  # channel c*4 + 2*i + j is pixel (i, j)
    assert sum(p.numel() for p in vae.parameters()) == 0


def test_a_saved_pixel_model_loads_as_a_pipeline_with_its_patches(tmp_path):
    from emoji_ldm.train.export import assemble_pipeline

    preset = get_preset("pixel32", {"unet.block_out_channels": "32,32,32"})
    pipe = assemble_pipeline(build_unet(preset), preset, "")  # as train exports it: no VAE to copy
    assert pipe.vae_scale_factor == 2
    pipe.save_pretrained(tmp_path)
    loaded = load_sd_pipeline(str(tmp_path))
    assert isinstance(loaded.vae, PatchAutoencoder) and loaded.vae_scale_factor == 2
    assert loaded.scheduler.config.prediction_type == "sample"
    images = loaded(["red heart"], num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 4, 32, 32)
    # a fresh process, as `emoji-ldm generate` or a Serve replica loads it: nothing has imported the patches yet
    code = ("import sys; from emoji_ldm.inference.sampler import load_pipeline; "
            "assert 'emoji_ldm.models.patches' not in sys.modules; "
            "print(type(load_pipeline(sys.argv[1]).vae).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PatchAutoencoder"


def test_encode_refuses_a_vae_for_a_pixel_model():
    from emoji_ldm.errors import UserError
    from emoji_ldm.train.encode import EncodeConfig

    with pytest.raises(UserError, match="--vae '/models/vae': preset 'pixel32' draws pixels .* leave --vae out"):
        EncodeConfig(dataset="/data/t", out="/data/l", preset="pixel32", vae="/models/vae")
    EncodeConfig(dataset="/data/t", out="/data/l", preset="tiny", vae="/models/vae")  # a tiny VAE is fine


def test_a_pixel_model_draws_its_own_alpha_and_has_no_vae_to_train(tmp_path):
    from emoji_ldm.errors import UserError
    from emoji_ldm.store.sidecar import record_image_mode
    from emoji_ldm.train.encode import image_lineage
    from emoji_ldm.train.vae import VAETrainConfig

    record_image_mode(str(tmp_path), "RGBA")
    lineage = image_lineage(str(tmp_path), None, get_preset("pixel32"))
    assert (lineage["vae_channels"], lineage["alpha"]) == (4, "vae")  # RGBA drawn, never keyed
    with pytest.raises(UserError, match="preset 'pixel32' draws pixels .* train-vae is only for presets that train"):
        VAETrainConfig(dataset="/d", out="/v", preset="pixel32").resolved_preset()


def test_encode_stores_a_pixel_models_images_as_patches_that_decode_to_them():
    import io

    import numpy as np
    from PIL import Image

    from emoji_ldm.store.latents import decode_latents
    from emoji_ldm.train.encode import Encoder

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA") for _ in range(2)]
    pngs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    preset = get_preset("pixel32")
    rows = Encoder(preset.to_dict(), None, "cpu")({"id": ["a", "b"], "image": pngs, "caption": ["red heart", ""],
                                                    "title": ["red heart", "blue heart"]})
    decoded = decode_latents(rows.to_pydict())
    assert decoded["latent"].shape == (2, 16, 16, 16)  # (B, 4 x 2 x 2, 32 / 2, 32 / 2)
    back = build_vae(preset).decode(torch.from_numpy(decoded["latent"]).float()).sample  # (B, 4, 32, 32)
    truth = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
    assert torch.allclose(back, truth.float(), atol=1e-3)  # float16 storage of 8-bit pixels


def test_train_refuses_latents_of_another_kind_and_resume_reads_older_sections():
    from emoji_ldm.errors import UserError
    from emoji_ldm.models.presets import saved_section
    from emoji_ldm.train.ldm import TrainConfig, _checked_preset

    pixel = {"preset": get_preset("pixel32").to_dict()}
    with pytest.raises(UserError, match="encoded with preset 'pixel32' .* train with --preset pixel32"):
        _checked_preset(TrainConfig(data="/d/latents", out="/d/run", preset="tiny"), None, pixel)
    older = {k: v for k, v in get_preset("small64").to_dict()["vae"].items() if k not in ("kind", "patch_size")}
    assert saved_section("vae", older) == get_preset("small64").to_dict()["vae"]  # saved before `kind` existed
