"""The VAE's training images: a sample bounded by the run and by bytes, never by the table (a RayJob's workers
hold it decoded)."""

from emoji_ldm.models.presets import get_preset
from emoji_ldm.train.vae import SAMPLE_BYTES, sample_cap


def test_the_sample_is_what_the_steps_draw_when_that_is_small():
    preset = get_preset("small64")
    assert sample_cap(preset, 10) == 10 * preset.vae.train_batch_size


def test_the_sample_holds_at_most_sample_bytes_of_pixels_however_many_steps():
    for name in ("small64", "tiny"):
        preset = get_preset(name)
        cap = sample_cap(preset, 10_000_000)
        image_bytes = 2 * preset.vae.channels * preset.image_size ** 2  # fp16 (C, H, W)
        assert cap * image_bytes <= SAMPLE_BYTES < (cap + 1) * image_bytes, name
