"""Set templates (serve/schemas.py): literal text with the exact placeholders {item} and {theme}, never a format
string, and a cap on the prompt each makes. A bad one is a pydantic error, so FastAPI answers 422 at once.
And the files a set's request makes (serve/sets.py): no item's file can take the contact sheet's name."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pydantic import ValidationError

from emoji_ldm.serve.schemas import MAX_SET_PROMPT_CHARS, EmojiSetRequest, JobRequest, render_template

BAD = [
    "{item}{theme:>2000000000}",   # a format spec: ~2 GB per item under str.format
    "{item:>99}", "{item:{theme}}", "{item!r}", "{item!s}", "{item!a}",  # specs, nested specs, conversions
    "{item.__class__}", "{item.__class__.__mro__}", "{theme.upper}",     # attribute access
    "{item[0]}", "{theme[__class__]}",                                   # index access
    "{}", "{0}", "{item} {1}", "{prompt} {item}", "{ item }",            # other fields
    "{item} {", "{item} }", "{{item}", "{theme} only",                   # unbalanced braces, no {item}
]


@pytest.mark.parametrize("model", [EmojiSetRequest, JobRequest])
@pytest.mark.parametrize("template", BAD)
def test_a_template_that_is_more_than_text_and_placeholders_is_refused_at_once(model, template):
    started = time.perf_counter()
    with pytest.raises(ValidationError) as e:
        model(theme="blob", items=["happy"] * 256, template=template)
    assert time.perf_counter() - started < 0.5
    (error,) = e.value.errors()
    assert error["loc"] == ("template",)
    assert "{item}" in error["msg"]  # says what a template may hold


@pytest.mark.parametrize("template, prompt", [
    ("{item} {theme}", "happy {theme} x blob"),
    ("{theme}: {item}, emoji", "blob: happy {theme} x, emoji"),
    ("{{literal}} {item}", "{literal} happy {theme} x"),
    ("{item}{item}", "happy {theme} xhappy {theme} x"),
])
def test_placeholders_are_put_in_once_and_values_are_never_read_as_templates(template, prompt):
    request = EmojiSetRequest(theme="blob", items=["happy {theme} x"], template=template)
    assert request.prompts() == [prompt]
    job = JobRequest(theme="blob", items=["happy {theme} x"], template=template)
    assert [p for _, p, _ in job.draws()] == [prompt]
    assert render_template(template, "happy {theme} x", "blob") == prompt


def test_the_prompt_a_template_makes_is_capped_and_the_error_names_the_cap():
    ok = EmojiSetRequest(theme="t" * 200, items=["i" * 200], template="{item} {theme}")
    assert len(ok.prompts()[0]) == 401 <= MAX_SET_PROMPT_CHARS
    for model in (EmojiSetRequest, JobRequest):
        with pytest.raises(ValidationError, match=f"longer than {MAX_SET_PROMPT_CHARS} characters"):
            model(theme="t" * 200, items=["short", "i" * 200], template="{item} {item} {theme}")
        with pytest.raises(ValidationError, match="item 0"):  # the default template too
            model(theme="t" * 400, items=["i" * 200])


def test_a_bulk_job_keeps_the_default_template_and_its_prompts():
    job = JobRequest(prompts=["a cat"], per_prompt=2)
    assert [p for _, p, _ in job.draws()] == ["a cat", "a cat"]


def asgi_post(app, path: str, body: dict) -> tuple[int, dict]:
    """POST to an ASGI app in this process (no socket): (status, JSON body)."""
    sent: list[dict] = []
    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    messages = [{"type": "http.request", "body": data, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_fastapi_answers_a_bad_template_with_422_before_the_handler_runs():
    from fastapi import FastAPI

    app, calls = FastAPI(), []

    @app.post("/v1/emoji-sets")
    async def emoji_sets(body: EmojiSetRequest):
        calls.append(body)
        return {"prompts": body.prompts()}

    started = time.perf_counter()
    status, answer = asgi_post(app, "/v1/emoji-sets", {"theme": "blob", "items": ["a"] * 256,
                                                       "template": "{item}{theme:>2000000000}"})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "template"] and calls == []
    assert time.perf_counter() - started < 1
    status, answer = asgi_post(app, "/v1/emoji-sets", {"theme": "blob", "items": ["a"], "template": "{theme}: {item}"})
    assert status == 200 and answer == {"prompts": ["blob: a"]}


@pytest.mark.parametrize("target", ["slack", "raw"])
def test_an_item_named_sheet_does_not_overwrite_the_contact_sheet(target):
    import io

    from PIL import Image

    from emoji_ldm.serve.sets import MANIFEST, SHEET, set_files, set_manifest

    items = ["sheet", "Sheet!", "manifest", "happy"]
    manifest = set_manifest("set-1", "blob", items, items, {"seed": 0}, {}, "model", target)
    files = [i["file"] for i in manifest["items"]]
    assert len(set(files)) == len(items) and SHEET not in files and MANIFEST not in files
    assert [i["name"] for i in manifest["items"]][:2] == ["sheet_2", "sheet_3"]
    pngs = []
    for colour in ("red", "green", "blue", "white"):
        buf = io.BytesIO()
        Image.new("RGBA", (16, 16), colour).save(buf, "PNG")
        pngs.append(buf.getvalue())
    made = set_files(manifest, pngs)
    assert set(made) == {*files, SHEET, MANIFEST}
    assert Image.open(io.BytesIO(made[SHEET])).size != Image.open(io.BytesIO(made[files[0]])).size  # the grid
    with pytest.raises(ValueError, match=SHEET):  # a manifest from elsewhere that names it is refused
        set_files({**manifest, "items": [{**manifest["items"][0], "file": SHEET}]}, pngs[:1])
