"""`make gpu-train`'s CPU mode at its smallest: a tiny bundle (`gpu_check/bundle.py` on two Twemoji rows plus the
gallery and naming-sheet names, a one-layer BERT with MiniLM's tokenizer), a few steps of a narrow pixel32 through
the project's step, EMA and sampler, and the files the GPU run brings back."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from PIL import Image

from emoji_ldm.errors import UserError
from emoji_ldm.eval.naming import NAMING
from tests.conftest import REPO


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", REPO / "gpu_check" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bundle = _module("bundle")
train = _module("train")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from emoji_ldm.models.builders import minilm_path

    out = tmp_path_factory.mktemp("bundle")
    summary = bundle.build(bundle.BundleConfig(out=out, sources=("twemoji",), limit=2, text_encoder=False,
                                               wheels=False))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64)).save_pretrained(out / "minilm")
    tokenizer.save_pretrained(out / "minilm")
    return out, summary


def test_bundle_holds_every_naming_name_and_degrades_to_the_sources_present(tiny_bundle):
    out, summary = tiny_bundle
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert summary["styles"] == ["twemoji"] and summary["rows"] == len(meta["names"])
    assert {t["answer"] for t in meta["naming_sheet"]} == set(NAMING) <= set(meta["names"])
    assert all(len(set(t["options"])) == 4 and t["answer"] in t["options"] for t in meta["naming_sheet"])
    assert meta["captions"][0] == ""  # the empty caption: classifier-free guidance
    items, reason = bundle.source_items("nosuch")
    assert items == [] and "emoji_ldm.sources.nosuch" in reason


def test_cpu_mode_trains_samples_and_records(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    code = train.main(["--device", "cpu", "--bundle", str(tiny_bundle[0]), "--out", str(out), "--preset", "pixel32",
                       "--set", "unet.block_out_channels=32,32,32", "--batch", "4", "--max-steps", "8",
                       "--sample-steps", "2", "--seeds", "1", "--eval-seeds", "1"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"gallery.png", "naming-sheet.png", "naming-options.json",
                                               "naming-key.json", "eval.json", "record.json"}
    record = json.loads((out / "record.json").read_text())
    assert record["preset"] == "pixel32" and record["steps"] == 8 and record["timed_steps"] >= 1
    assert record["images_per_s"] > 0 and 0 < record["mfu"] and record["loader_images_per_s"] > 0
    assert record["gpu_busy_share"] is None  # no GPU kernels on a CPU
    assert record["peak_tflops_measured"] > 0 and record["minutes_trained"] > 0
    options = json.loads((out / "naming-options.json").read_text())["tiles"]
    assert len(options) == 24 and all("answer" not in t for t in options)
    assert [t["tile"] for t in json.loads((out / "naming-key.json").read_text())["tiles"]] == list(range(1, 25))
    with Image.open(out / "naming-sheet.png") as sheet, Image.open(out / "gallery.png") as gallery:
        assert sheet.width > sheet.height and gallery.height > gallery.width  # 6 x 4 tiles; 8 prompts x 1 seed
    result = json.loads((out / "eval.json").read_text())
    assert set(result["unseen_colour_share"]) == {"purple cat face", "green ghost"}
    assert result.get("prompt_accuracy") is not None or result["skipped"]


def test_missing_bundle_is_one_line_naming_the_make_target(tmp_path, capsys):
    with pytest.raises(UserError, match="make gpu-train-bundle"):
        train.RunConfig(device="cpu", bundle=tmp_path)
    assert train.main(["--device", "cpu", "--bundle", str(tmp_path / "none")]) == 2
    assert "gpu-train: error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(train.CANDIDATES))
def test_every_candidate_draws_pixels_as_pixel32_trains_them(name):
    """Predicting the clean image under DDPM's linear betas: SD's scaled-linear betas are for latents."""
    from emoji_ldm.models.presets import get_preset

    base, overrides, _, _ = train.CANDIDATES[name]
    preset = get_preset(base, overrides)
    assert preset.vae.kind == "patches" and preset.noise.prediction_type == "sample"
    assert (preset.noise.beta_schedule, preset.noise.beta_start, preset.noise.beta_end) == ("linear", 0.0001, 0.02)
