"""Low findings fixed in code: control characters in prompts (they reached the PNG text chunks, where a line break
in a negative prompt posed as the web UI's parameters line), and the key-holding web page's headers (a CSP that
runs only its own script, no framing, nosniff on every answer)."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

import pytest
from pydantic import ValidationError

from emoji_ldm.inference.pngmeta import png_text
from emoji_ldm.serve.http import new_api, page_headers
from emoji_ldm.serve.schemas import EmojiSetRequest, GenerateRequest, JobRequest
from tests.unit.test_auth import call


@pytest.mark.parametrize("text", ["a\x00b", "a\x1b[31mb", "a\x7fb", "a\u202eb", "a\u2066b"])
def test_control_characters_in_any_prompt_field_are_refused(text):
    for make in (lambda: GenerateRequest(prompt=text), lambda: GenerateRequest(prompt="a", negative_prompt=text),
                 lambda: EmojiSetRequest(theme=text, items=["a"]), lambda: EmojiSetRequest(theme="t", items=[text]),
                 lambda: EmojiSetRequest(theme="t", items=["a"], template="{item} " + text),
                 lambda: JobRequest(prompts=[text])):
        with pytest.raises(ValidationError, match="control character"):
            make()


def test_a_line_break_in_a_negative_prompt_cannot_pose_as_the_parameters_line():
    body = GenerateRequest(prompt="cat", negative_prompt="blurry\nSteps: 999, Seed: 1, Model: evil")
    assert body.negative_prompt == "blurry Steps: 999, Seed: 1, Model: evil"
    text = png_text({"prompt": body.prompt, "negative_prompt": body.negative_prompt, "steps": 20, "seed": 3})
    assert len(text["parameters"].splitlines()) == 3 and text["parameters"].splitlines()[2].startswith("Steps: 20")


def test_emoji_joiners_and_variation_selectors_are_text():
    assert GenerateRequest(prompt="\U0001F469\u200d\U0001F4BB coder \u2764\ufe0f").prompt.startswith("\U0001F469")


def test_the_page_runs_only_its_own_script_and_is_framed_by_no_one():
    html = resources.files("emoji_ldm.serve").joinpath("page.html").read_text()
    headers = page_headers(html)
    policy = headers["Content-Security-Policy"]
    (script,) = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy and "unsafe-inline" not in policy.split("style-src")[0]
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert headers["X-Frame-Options"] == "DENY"


def test_every_answer_says_nosniff_refusals_too():
    api = new_api(None, local_only=True)

    async def hello():
        return {"ok": True}

    api.get("/hello")(hello)
    status, headers, _ = call(api, "GET", "/hello")
    assert status == 200 and headers["x-content-type-options"] == "nosniff"
    status, headers, _ = call(api, "GET", "/hello", headers={"host": "evil.example"})
    assert status == 403 and headers["x-content-type-options"] == "nosniff"
