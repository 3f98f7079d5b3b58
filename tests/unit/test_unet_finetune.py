"""A partial fine-tune (`unet.finetune=attn2|lora`) of a from-scratch UNet is refused when the config is built.

The grids and the export rebuild the UNet and take only the trained tensors from the EMA: the frozen rest of a
from-scratch UNet would be exported as random weights."""

from __future__ import annotations

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import get_preset
from emoji_ldm.train.ldm import TrainConfig


@pytest.mark.parametrize("preset, sets", [
    ("tiny", {"unet.finetune": "attn2"}),
    ("emoji64", {"unet.finetune": "lora"}),
    ("sd-finetune", {"unet.pretrained": "none"}),  # its default finetune is attn2
])
def test_partial_finetune_of_a_scratch_unet_is_refused(preset, sets):
    mode = sets.get("unet.finetune", "attn2")
    with pytest.raises(UserError, match=rf"^unet.finetune={mode} trains part of a UNet, but unet.pretrained is unset "
                                        r".*use unet.finetune=full, or set unet.pretrained"):
        get_preset(preset, sets)


def test_train_refuses_it_on_the_driver():
    with pytest.raises(UserError, match="unet.finetune=lora trains part of a UNet"):
        TrainConfig(data="/latents", out="/run", overrides={"unet.finetune": "lora"})


def test_full_or_pretrained_is_accepted():
    assert get_preset("tiny", {"unet.finetune": "full"}).unet.pretrained is None
    assert get_preset("sd-finetune", {"unet.finetune": "lora"}).unet.finetune == "lora"
    assert get_preset("tiny", {"unet.finetune": "lora", "unet.pretrained": "/models/sd15"}).unet.finetune == "lora"
