"""The vLLM captioner's processor config, with a stub `vllm` module (vLLM needs CUDA: it is not installed here).

Both captioners must show Qwen2.5-VL the same image for the same model name: the vLLM engine's
`mm_processor_kwargs` are the transformers captioner's image processor kwargs."""

from __future__ import annotations

import inspect
import io
import sys
import tomllib
import types
from pathlib import Path

import pytest

from emoji_ldm.caption.prompt import DEFAULT_TEMPLATE
from emoji_ldm.caption.qwen import IMAGE_PIXELS, QwenCaptioner, image_size_kwargs
from emoji_ldm.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


class _Rows(list):
    """What a Ray Dataset offers vllm_caption: `map`."""

    def map(self, fn):
        return _Rows(fn(r) for r in self)


def _png(size: int = 64) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGBA", (size, size), (200, 40, 40, 255)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def built(monkeypatch):
    """vllm_caption run with a stub `vllm` and a stand-in `build_processor` that records what it was given."""
    import ray.data.llm

    from emoji_ldm.caption.vllm import vllm_caption

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    seen = {}

    def build_processor(config, preprocess, postprocess):
        seen["config"] = config

        def processor(ds):  # each row "generates" a caption from its prompt, as the engine stages would
            return _Rows(postprocess({**preprocess(row), "generated_text": "a red square emoji"}) for row in ds)

        return processor

    monkeypatch.setattr(ray.data.llm, "build_processor", build_processor)
    rows = [{"id": "a", "image": _png(), "title": "red square", "_file": "part-0.parquet"}]
    seen["rows"] = vllm_caption(_Rows(rows), "Qwen/Qwen2.5-VL-3B-Instruct", DEFAULT_TEMPLATE, max_new_tokens=32,
                                concurrency=1, batch_size=8)
    return seen


def test_vllm_engine_scales_images_as_the_transformers_captioner(built):
    kwargs = built["config"].engine_kwargs["mm_processor_kwargs"]
    assert kwargs == image_size_kwargs() == {"min_pixels": 224 * 224, "max_pixels": 256 * 256}
    assert inspect.signature(QwenCaptioner).parameters["image_pixels"].default == IMAGE_PIXELS
    assert built["rows"] == [{"id": "a", "caption": "a red square emoji", "error": None, "_file": "part-0.parquet"}]


def test_those_kwargs_give_a_64px_emoji_64_visual_tokens():
    """What the engine's Qwen2-VL image processor does with them: 224x224, 8x8 merged patches (4 without)."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    im = Image.open(io.BytesIO(_png(64))).convert("RGB")

    def tokens(processor) -> int:
        grid = processor(images=[im], return_tensors="pt")["image_grid_thw"]  # (1, 3): t, h, w patches
        return int(grid[0].prod()) // processor.merge_size**2

    assert tokens(Qwen2VLImageProcessorPil(**image_size_kwargs())) == 64
    assert tokens(Qwen2VLImageProcessorPil()) == 4  # the processor's own minimum, 56x56: what vLLM used before


def test_transformers_captioner_uses_the_same_kwargs(monkeypatch):
    import transformers

    seen = {}

    class Loaded:
        merge_size = 2
        pad_token = "<pad>"

        def to(self, device):
            return self

        def eval(self):
            return self

    def loader(name):
        def from_pretrained(model, **kwargs):
            seen[name] = kwargs
            return Loaded()
        return from_pretrained

    for name in ("Qwen2_5_VLForConditionalGeneration", "AutoTokenizer", "Qwen2VLImageProcessorPil"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", loader(name))
    QwenCaptioner("/m", DEFAULT_TEMPLATE)
    assert seen["Qwen2VLImageProcessorPil"] == image_size_kwargs()


def test_missing_vllm_names_an_install_that_exists(monkeypatch):
    from emoji_ldm.caption.vllm import vllm_caption

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(UserError) as e:
        vllm_caption(_Rows(), "Qwen/Qwen2.5-VL-3B-Instruct", DEFAULT_TEMPLATE, 32, 1, 8)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = [part.split("]")[0] for part in str(e.value).split("emoji-ldm[")[1:]]
    assert all(extra in extras for extra in named), f"{e.value} names extras {named}; pyproject has {list(extras)}"
    assert "pip install vllm" in str(e.value)
