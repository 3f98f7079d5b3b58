"""DreamBooth applies the fast-path options as `train` does (they were once parsed and then ignored)."""

from __future__ import annotations

from emoji_ldm.train.dreambooth import DreamBoothConfig
from emoji_ldm.train.dreambooth_lora import configure
from emoji_ldm.train.speed import SpeedOptions
from tests.tiny_models import tiny_sd_pipeline


def test_gradient_checkpointing_reaches_the_unet_and_text_encoder(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_pipeline(tmp_path / "sd")), safety_checker=None,
                                                   requires_safety_checker=False)
    config = DreamBoothConfig(base="x", instance_data="dir:x", instance_prompt="a sks cat", class_prompt="a cat",
                              out="x", train_text_encoder=True, speed=SpeedOptions(gradient_checkpointing=True))
    params = configure(pipe, config)
    assert params and pipe.unet.is_gradient_checkpointing
    assert pipe.text_encoder.is_gradient_checkpointing



def test_class_actors_fit_the_gpus_with_gpu_and_the_cpus_without():
    import pytest

    from emoji_ldm.errors import UserError
    from emoji_ldm.train.dreambooth_data import class_actor_count

    assert class_actor_count(4, True, {"CPU": 16, "GPU": 2}) == (2, "--class-actors 4 lowered to 2: the cluster has "
                                                                   "2 GPUs")
    assert class_actor_count(2, True, {"CPU": 16, "GPU": 2}) == (2, None)
    assert class_actor_count(4, False, {"CPU": 2, "GPU": 8})[0] == 2
    with pytest.raises(UserError, match="no GPUs"):
        class_actor_count(1, True, {"CPU": 16})


def test_the_card_keys_only_photos_with_alpha():
    """A table built without --background stores RGBA, opaque photos too: only a photo with a pixel below opaque
    makes the model `key` (learned on the key colour); JPEGs and opaque PNGs keep their backgrounds."""
    import io

    from PIL import Image

    from emoji_ldm.train.dreambooth_data import has_alpha

    def png(image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()

    opaque = Image.new("RGBA", (8, 8), (200, 30, 30, 255))
    cut = opaque.copy()
    cut.putpixel((0, 0), (0, 0, 0, 0))
    assert not has_alpha(png(opaque)) and not has_alpha(png(opaque.convert("RGB")))
    assert has_alpha(png(cut)) and has_alpha(png(cut.convert("LA")))
