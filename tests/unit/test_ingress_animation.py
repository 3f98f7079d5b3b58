"""The Ingress's /v1/generate and /v1/emoji-sets routes in this process, without Ray: a stand-in Generator handle
draws with a real Sampler on a tiny RGBA model. What Serve adds (batching, replicas, HTTP) is in
tests/integration/test_serve_animation.py; this is the cheap check of what the routes do with an animation,
a target's cap and a judge."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image
from starlette.requests import Request

from emoji_ldm.inference.targets import TARGETS, Target
from emoji_ldm.serve.errors import ApiError
from emoji_ldm.serve.schemas import EmojiSetRequest, GenerateRequest

RGBA_MODEL = {"dataset_mode": "RGBA", "vae_channels": 4, "alpha": "vae", "key_colour": None}
REQUEST = Request({"type": "http", "headers": [], "method": "POST", "path": "/v1/generate"})


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


@pytest.fixture(scope="module")
def ingress(tmp_path_factory):
    """(an Ingress without a judge, one with the tiny judge of test_serve_animation)."""
    from emoji_ldm.inference.sampler import Sampler
    from emoji_ldm.serve.app import Ingress
    from tests.integration.test_serve_animation import tiny_judge
    from tests.tiny_models import tiny_model_with_card

    root = tmp_path_factory.mktemp("ingress")
    model = str(tiny_model_with_card(root / "model", RGBA_MODEL))
    sampler = Sampler.load(model)

    class Generator:
        sample = _Remote(lambda job: sampler.pngs([job], True, 4)[0])
        model_card = _Remote(lambda: {"uri": model, "content_id": "test"})

    made = []
    for judge in ("", tiny_judge(root / "judge")):
        cls = Ingress.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper
        made.append(object.__new__(cls))
        cls.__init__(made[-1], Generator(), {"model": model, "max_batch_size": 4, "judge": judge})
    return made


@pytest.mark.parametrize("fmt", ["apng", "gif", "webp"])
def test_generate_answers_the_loop_in_its_format_under_the_cap(ingress, fmt):
    body = GenerateRequest(prompt="grinning cat", steps=2, animation={"frames": 6, "format": fmt}, target="slack",
                           format="png")
    answer = asyncio.run(ingress[0].generate(body, REQUEST))
    assert answer.media_type == f"image/{fmt}" and len(answer.body) <= 128 * 1024
    with Image.open(io.BytesIO(answer.body)) as im:
        assert im.is_animated and im.n_frames == 6 and im.size == (128, 128)


def test_a_loop_over_the_cap_is_a_422(ingress, monkeypatch):
    monkeypatch.setitem(TARGETS, "slack", Target("slack", 128, 500))
    body = GenerateRequest(prompt="grinning cat", steps=2, animation={"frames": 6, "format": "webp"}, target="slack")
    with pytest.raises(ApiError) as refused:
        asyncio.run(ingress[0].generate(body, REQUEST))
    assert refused.value.status == 422 and refused.value.field == "animation" and "500 bytes" in refused.value.message


def test_a_set_without_a_judge_and_with_one(ingress):
    body = dict(theme="emoji", items=["grinning cat", "red heart", "xyzzy"], template="{item}", steps=2, seed=7,
                target="discord", animation={"frames": 4, "format": "webp"}, format="json")
    plain = asyncio.run(ingress[0].emoji_set(EmojiSetRequest(**body), REQUEST))["manifest"]
    assert plain["quality"]["legibility"].startswith("not measured: no judge")
    assert [i["file"] for i in plain["items"]] == ["grinning_cat.webp", "red_heart.webp", "xyzzy.webp"]
    with pytest.raises(ApiError) as refused:
        asyncio.run(ingress[0].emoji_set(EmojiSetRequest(**body, min_legibility=0.5), REQUEST))
    assert refused.value.status == 409 and refused.value.field == "min_legibility"

    judged = asyncio.run(ingress[1].emoji_set(EmojiSetRequest(**body, min_legibility=1.0, max_redraws=1), REQUEST))
    quality = judged["manifest"]["quality"]
    assert quality["legibility"]["labelled"] == 2 and quality["legibility"]["items"][2] is None
    assert quality["consistency"]["outlier"] in range(3) and quality["max_redraws"] == 1
    for item in judged["manifest"]["items"]:
        mine = [r for r in quality["redraws"] if r["index"] == item["index"]]
        assert len(mine) <= 1 and all(r["seed"] == 8 for r in mine)
        if item["legibility"] is not None and item["legibility"] < 1.0:
            assert len(mine) == 1  # under the floor: its one redraw was used, and recorded
    json.dumps(judged["manifest"])  # the manifest is JSON as it is


def test_redraws_are_charged_and_stop_when_the_key_has_spent_its_budget(ingress, monkeypatch):
    """A set's redraws for legibility cost what drawing their items costs: a key whose minute's budget is exactly
    the set gets the set, with no redraw and the reason in its quality (they were free: min_legibility 1.0 bought
    up to 1 + max_redraws times the drawing for the price of one)."""
    from emoji_ldm.serve import meter
    from emoji_ldm.serve.keys import ApiKey

    shared = meter.Meter()

    async def ask(method, *args):  # the meter actor's decisions, in this process
        return getattr(shared, method)(*args)

    monkeypatch.setattr(meter, "ask", ask)
    body = dict(theme="emoji", items=["grinning cat", "red heart", "slightly smiling face"], template="{item}",
                steps=2, seed=7, format="json", min_legibility=1.0, max_redraws=3)
    key = ApiKey(name="k", hash="0" * 64, cost_per_minute=3 * 2)  # 3 items x 2 steps at 64 px or less
    request = Request({"type": "http", "headers": [], "method": "POST", "path": "/v1/emoji-sets",
                       "state": {"api_key": key}})
    quality = asyncio.run(ingress[1].emoji_set(EmojiSetRequest(**body), request))["manifest"]["quality"]
    assert quality["redraws"] == [] and "cost units a minute" in quality["redraws_stopped"], quality
