"""DreamBooth end to end on real Ray (Ray Data class images, Ray Train + DeepSpeed on 2 CPU workers) with a tiny
SD 1.x-layout pipeline (random UNet and VAE, the pretrained MiniLM text encoder): it proves the code runs, never a
quality result. The runs take what a GPU run uses, on CPU: DeepSpeed bf16, whose frozen weights must come out
exactly as the base had them, and a LoRA on a BERT-family text encoder, which diffusers loads only with the
adapter metadata saved beside the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from emoji_ldm.cli.dreambooth import dreambooth
from emoji_ldm.cli.main import main
from emoji_ldm.errors import UserError
from emoji_ldm.inference.sampler import SampleJob, Sampler
from emoji_ldm.train.dreambooth import DreamBoothConfig
from emoji_ldm.train.speed import SpeedOptions
from tests.tiny_models import tiny_sd_pipeline


@pytest.fixture(scope="module")
def subject(ray_local, tmp_path_factory):
    """A tiny SD pipeline (32 px, MiniLM text encoder) and five photos of 'the subject' (a red disc on varied
    backgrounds, any size)."""
    root = tmp_path_factory.mktemp("dreambooth")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        size = (40 + 8 * i, 48)  # not square, not the model's size: padded on ingest
        image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(150, 255, 3)))
        image.paste((220, 30, 30), (8, 8, 32, 32))
        image.save(photos / f"photo-{i}.{'jpg' if i % 2 else 'png'}")
    (photos / "notes.txt").write_text("not an image")  # rejected with a reason, not fatal
    return root, tiny_sd_pipeline(root / "sd", text_encoder="minilm"), photos


def _config(root, sd, photos, out, **kwargs):
    base = dict(base=str(sd), instance_data=f"dir:{photos}", instance_prompt="a sks cat emoji",
                class_prompt="a cat emoji", out=str(root / out), class_data=str(root / "classes"),
                num_class_images=4, class_steps=2, class_batch=4, max_steps=2, checkpoint_every=2, log_every=1)
    return DreamBoothConfig(**{**base, **kwargs})


def test_full_in_bf16_then_lora_reuse_the_class_images(subject, capsys):
    """Full DeepSpeed bf16 (bf16 module, fp32 masters) with accumulation and prior preservation: the frozen text
    encoder and VAE come out bit for bit as the base had them, the trained UNet in fp32 from the masters. Then the
    README's LoRA command on the UNet and the BERT text encoder, reusing the class images: the adapter loads as
    diffusers and `serve --adapter` load it, and the fused model draws as `generate` does."""
    from diffusers import StableDiffusionPipeline

    root, sd, photos = subject
    # 2 micro-batches a step (1 instance photo and 1 class image on each of the 2 workers, twice)
    card = dreambooth(_config(root, sd, photos, "full", batch_size=4, grad_accum=2, lr=1e-2,
                              speed=SpeedOptions(precision="bf16")))
    assert card["class_generated"] == 4 and card["class_reused"] == 0
    assert (card["training"]["batch_size"], card["training"]["grad_accum"]) == (4, 2)
    assert len(card["instance_photos"]) == 5 and card["instance_prompt"] == "a sks cat emoji"
    # photos not square are padded with transparent bars on ingest: learned on the key colour, keyed back out
    assert card["image"] == {"dataset_mode": "RGBA", "vae_channels": 3, "alpha": "key", "key_colour": "#00ff00"}
    rows = [json.loads(line) for line in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["prior_loss"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert all(abs(r["loss"] - r["instance_loss"] - r["prior_loss"]) < 1e-4 for r in rows)  # weight 1.0
    full = StableDiffusionPipeline.from_pretrained(root / "full" / "model", safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    exported, frozen = (load_file(next((folder / "text_encoder").glob("*.safetensors")))
                        for folder in (root / "full" / "model", sd))
    assert exported.keys() == frozen.keys() and all(torch.equal(exported[k], frozen[k]) for k in frozen)
    assert {p.dtype for p in full.unet.parameters()} == {torch.float32}
    assert not torch.equal(full.unet.conv_in.weight, base.unet.conv_in.weight)  # the UNet was trained
    assert torch.equal(full.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)

    # the README's command 1, as typed (the CLI generated from DreamBoothConfig)
    assert main(["dreambooth", "--base", str(sd), "--instance-data", f"dir:{photos}",
                 "--instance-prompt", "a sks cat emoji", "--class-prompt", "a cat emoji", "--method", "lora",
                 "--lora-rank", "4", "--train-text-encoder", "--lr", "1e-2", "--out", str(root / "lora"),
                 "--class-data", str(root / "classes"), "--num-class-images", "4", "--class-steps", "2",
                 "--class-batch", "4", "--max-steps", "2", "--checkpoint-every", "2", "--log-every", "1"]) == 0
    assert "class images: 4 reused, 0 drawn" in capsys.readouterr().out  # same base and class prompt: reused
    assert (root / "lora" / "lora" / "pytorch_lora_weights.safetensors").exists()

    def draw(pipe):
        return pipe("a sks cat emoji", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    before = draw(base)
    base.load_lora_weights(root / "lora" / "lora")  # the standard diffusers/peft format
    assert not np.allclose(before, draw(base))  # the adapter changes the output
    fused = StableDiffusionPipeline.from_pretrained(root / "lora" / "model", safety_checker=None)
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())  # OUT/model: LoRA fused

    # what `serve --adapter my-cat=OUT` does in each replica: the base once, the adapter chosen per job
    sampler = Sampler.load(str(sd))
    assert sampler.load_adapter("my-cat", str(root / "lora"))["instance_prompt"] == "a sks cat emoji"
    job = dict(prompts=("a sks cat emoji happy", "a sks cat emoji sad"), seeds=(0, 1), steps=2)
    mine, plain = (sampler.pngs([SampleJob(**job, adapter=a)])[0] for a in ("my-cat", None))
    assert [png for png, _ in mine] != [png for png, _ in plain] and mine[0][1]["adapter"] == "my-cat"
    (drawn,) = Sampler.load(str(root / "lora" / "model")).pngs([SampleJob(("a sks cat emoji",), (0,), "", 2, 3.0)])
    assert drawn[0][0].startswith(b"\x89PNG")  # the fused model, as `generate --model OUT/model` loads it


def test_square_opaque_photos_keep_their_backgrounds(subject, tmp_path):
    """JPEGs and opaque PNGs fill the square: the RGBA instance table holds no alpha, the card says none (it
    once said key for every RGBA table, and generation keyed photos' backgrounds)."""
    from emoji_ldm.cli.dreambooth import instance_table
    from emoji_ldm.train.dreambooth_data import image_card

    root, sd, _ = subject
    photos = tmp_path / "square"
    photos.mkdir()
    for i in range(3):
        image = Image.new("RGB", (48, 48), (160 + 30 * i, 200, 120))
        image.paste((220, 30, 30), (8, 8, 32, 32))
        image.save(photos / f"photo-{i}.{'jpg' if i % 2 else 'png'}")
    uri, version, _ = instance_table(_config(root, sd, photos, "square"), str(tmp_path / "run"), 32)
    assert image_card(uri, version) == {"dataset_mode": "RGBA", "vae_channels": 3, "alpha": "none",
                                         "key_colour": None}


@pytest.mark.parametrize("kwargs, text", [
    ({"instance_data": "dir:{few}"}, "gave 2 usable photos: DreamBooth takes 3 to 1000"),
    ({"class_prompt": "a sks cat emoji"}, "equals --instance-prompt"),
    ({"lora_rank": 0}, "--lora-rank must be 1-256"),
    ({"base": "{root}/no-model"}, "no model at"),
])
def test_bad_input_is_refused_and_nothing_is_written(subject, kwargs, text):
    root, sd, photos = subject
    few = root / "few"
    few.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.open(next(photos.glob("*.png"))).save(few / name) if name == "a.png" else \
            Image.new("RGB", (20, 20), "blue").save(few / name)
    kwargs = {k: v.format(few=few, root=root) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(UserError, match=text):
        dreambooth(_config(root, sd, photos, "bad", **kwargs))
    assert not (root / "bad" / "instance").exists() and not (root / "bad" / "model").exists()
