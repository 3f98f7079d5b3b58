"""Legibility at chat size in durable jobs, without Ray or a model: a job's runner in this process with a stand-in
Drawer (Ray calls run lazily, when the runner waits on them, as a real object ref resolves) and a stand-in judge
that reads a strongly red centre as a heart and anything else as a cat face; the /v1/jobs route over ASGI."""

from __future__ import annotations

import io
import json
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from emoji_ldm.serve import sets
from emoji_ldm.serve.jobs.runner import JobRunner
from emoji_ldm.serve.jobs.store import JobSpec, public_state
from emoji_ldm.serve.schemas import JobRequest
from tests.unit.test_job_animation import jobs_api  # noqa: F401 (the fixture)

SET = dict(theme="emoji", items=["red heart", "grinning cat", "blue heart", "yellow heart"], template="{item}",
           seed=3, steps=2)


def _png(kind: str) -> bytes:
    """A blue square (read as a cat face on every theme), a red disc (a heart on every theme), or a faint red disc
    (a heart on the light themes only: on a dark one its centre is too dark)."""
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    fill = {"square": (30, 60, 220, 255), "red": (220, 20, 20, 255), "faint": (200, 0, 0, 128)}[kind]
    (draw.rectangle if kind == "square" else draw.ellipse)((4, 4, 28, 28), fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class _Judge:
    classes, meta, size = ["cat-face", "heart"], {"label": "subgroup"}, 8

    def __init__(self):
        self.seen = 0  # images measured

    def predict(self, pixels):
        self.seen += len(pixels)
        centre = pixels[:, 4, 4].astype(int)  # (B, 3)
        return ["heart" if r > 150 and r > b + 50 else "cat-face" for r, _, b in centre]


class _Drawer:
    """Draws `look(prompt, seed)`; `calls` holds each call's (prompts, seeds); a prompt in `fail` loses the node."""

    def __init__(self, look, calls: list, fail: set):
        self.look, self.calls, self.fail = look, calls, fail

    def ready(self) -> int:
        return 2  # items per chunk

    def pngs(self, job, metadata, max_batch):
        if self.fail & set(job.prompts):
            raise RuntimeError("the drawer's node was lost")
        self.calls.append((job.prompts, job.seeds))
        return [(_png(self.look(p, s)), {"prompt": p, "seed": s}) for p, s in zip(job.prompts, job.seeds)]


class _Actor:  # a Ray actor handle: a call's ref is a thunk that runs when the runner gets it
    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        return SimpleNamespace(remote=lambda *a: (lambda: getattr(self.obj, name)(*a)))


def _set_look(prompt: str, seed: int) -> str:
    if prompt == "red heart":  # illegible, then legible on light themes only, then illegible again
        return {3: "square", 4: "faint"}.get(seed, "square")
    if prompt == "yellow heart":
        return "square" if seed == 3 else "red"
    return "square" if prompt == "grinning cat" else "red"


@pytest.fixture
def jobs(monkeypatch, tmp_path):
    """make(body, judge, job_id, look) -> a JobRunner (not started) whose Drawer is a `_Drawer`; `.judge` the
    stand-in judge, `.calls` the Drawer's calls, `.fail` prompts whose chunk loses the node."""
    import ray

    judge, calls, fail = _Judge(), [], set()
    look = {"fn": _set_look}
    monkeypatch.setattr(sets, "service_judge", lambda uri: judge)
    monkeypatch.setattr(ray, "remote", lambda cls: SimpleNamespace(options=lambda **kw: SimpleNamespace(
        remote=lambda *a: _Actor(_Drawer(look["fn"], calls, fail)))))
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (refs, []))
    monkeypatch.setattr(ray, "get", lambda ref: ref())
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")

    def make(body: dict, judge_uri: str = "/judges/one", job_id: str = "job-test-0001", look_fn=None):
        if look_fn:
            look["fn"] = look_fn
        spec = JobSpec(str(tmp_path / "jobs"), "_local", job_id, body, "h", str(model), judge=judge_uri)
        runner = object.__new__(JobRunner)
        runner.spec, runner.folder, runner._cancel = spec, spec.folder, threading.Event()
        runner.request = {"body": body, "created_at": "2026-11-26T00:00:00Z", "judge": judge_uri}
        return runner

    return SimpleNamespace(make=make, judge=judge, calls=calls, fail=fail)


def _ended(runner) -> tuple[dict, dict]:
    """(the job's state.json, its manifest.json) once it has run."""
    with open(os.path.join(runner.folder, "state.json")) as f:
        state = json.load(f)
    assert state["state"] == "succeeded", state["errors"]
    with open(state["result"]["manifest"]) as f:
        return state, json.load(f)


def test_a_job_records_each_items_legibility_and_redraws_under_the_floor_keeping_the_most_legible(jobs):
    body = JobRequest(**SET, min_legibility=1.0, max_redraws=2).model_dump(mode="json")
    runner = jobs.make(body)
    runner._run()
    state, manifest = _ended(runner)
    quality = manifest["quality"]
    # red heart: seed 4 reads on the light themes (0.5, kept), seed 5 not at all (kept no more): 2 redraws, its
    # limit; yellow heart: seed 4 reads everywhere, so it stops there; the others read at once
    assert [(r["index"], r["seed"], r["legibility"], r["was"], r["kept"]) for r in quality["redraws"]] == [
        (0, 4, 0.5, 0.0, True), (0, 5, 0.0, 0.5, False), (3, 4, 1.0, 0.0, True)]
    assert [(i["seed"], i["legibility"]) for i in manifest["items"]] == [(4, 0.5), (3, 1.0), (3, 1.0), (4, 1.0)]
    assert sorted(jobs.calls) == [(("blue heart", "yellow heart"), (3, 3)), (("red heart",), (4,)),
                                  (("red heart",), (5,)), (("red heart", "grinning cat"), (3, 3)),
                                  (("yellow heart",), (4,))]
    with open(os.path.join(runner.folder, "images", "00000.json")) as f:
        assert json.load(f)["seed"] == 4  # the file kept is the kept draw
    legibility = quality["legibility"]
    assert legibility["themes"] == {"slack-light": 1.0, "slack-dark": 0.75, "discord-light": 1.0,
                                    "discord-dark": 0.75}
    assert legibility["min"] == 0.75 and legibility["labelled"] == 4 and legibility["min_legibility"] == 1.0
    assert quality["max_redraws"] == 2 and quality["judge"]["uri"] == "/judges/one"
    assert quality["consistency"].startswith("not measured for jobs")
    summary = public_state(state)["legibility"]  # the job's own summary, as GET /v1/jobs/{id} says it
    assert summary["min"] == 0.75 and summary["redraws"] == 3 and "items" not in summary


def test_a_resumed_job_neither_redraws_nor_measures_what_it_recorded_and_ends_as_an_unbroken_one(jobs):
    body = JobRequest(**SET, min_legibility=1.0, max_redraws=2).model_dump(mode="json")
    whole = jobs.make(body, job_id="job-test-whole")
    whole._run()
    _, unbroken = _ended(whole)
    jobs.calls.clear()
    jobs.judge.seen = 0
    jobs.fail.add("blue heart")  # the node is lost drawing the second chunk
    broken = jobs.make(body, job_id="job-test-0002")
    with pytest.raises(RuntimeError, match="node was lost"):
        broken._draw({"done": 0})
    with open(os.path.join(broken.folder, "state.json")) as f:
        assert json.load(f)["done"] == 2
    assert jobs.calls == [(("red heart", "grinning cat"), (3, 3)), (("red heart",), (4,)), (("red heart",), (5,))]
    jobs.fail.clear()
    jobs.calls.clear()
    jobs.judge.seen = 0
    resumed = jobs.make(body, job_id="job-test-0002")  # a new runner, as after a restart
    resumed._run()
    _, manifest = _ended(resumed)
    # only the second chunk is drawn and measured (2 items and 1 redraw, on 4 themes each); packaging measures none
    assert jobs.calls == [(("blue heart", "yellow heart"), (3, 3)), (("yellow heart",), (4,))]
    assert jobs.judge.seen == 3 * 4
    assert manifest["quality"]["redraws"] == unbroken["quality"]["redraws"]
    assert manifest["quality"]["legibility"] == unbroken["quality"]["legibility"]
    assert [(i["seed"], i["legibility"]) for i in manifest["items"]] == [
        (i["seed"], i["legibility"]) for i in unbroken["items"]]


def test_a_bulk_redraw_takes_a_seed_past_its_prompts_other_images():
    bulk = JobRequest(prompts=["red heart", "a cat"], per_prompt=3, seed=10, min_legibility=0.5)
    assert [s for _, _, s in bulk.draws()] == [10, 11, 12, 10, 11, 12]
    assert [bulk.redraw_seed(i, 1) for i in range(6)] == [13, 14, 15, 13, 14, 15]
    assert [bulk.redraw_seed(i, 2) for i in range(3)] == [16, 17, 18]
    assert JobRequest(**SET).redraw_seed(2, 1) == 4  # a set's items share a seed: the next one


def test_a_bulk_job_redraws_each_image_from_its_own_seeds(jobs):
    body = JobRequest(prompts=["red heart"], per_prompt=2, seed=3, steps=2, min_legibility=1.0).model_dump(
        mode="json")
    runner = jobs.make(body, look_fn=lambda p, s: "red" if s >= 5 else "square")
    runner._run()
    _, manifest = _ended(runner)
    assert [(r["index"], r["seed"], r["kept"]) for r in manifest["quality"]["redraws"]] == [(0, 5, True),
                                                                                            (1, 6, True)]
    assert [i["seed"] for i in manifest["items"]] == [5, 6]


def test_a_job_without_a_judge_says_so_and_measures_nothing(jobs):
    body = JobRequest(**SET).model_dump(mode="json")
    runner = jobs.make(body, judge_uri="")
    runner._run()
    state, manifest = _ended(runner)
    assert manifest["quality"]["legibility"] == sets.NO_JUDGE and manifest["quality"]["redraws"] == []
    assert [i["seed"] for i in manifest["items"]] == [3, 3, 3, 3] and "legibility" not in manifest["items"][0]
    assert public_state(state)["legibility"] == sets.NO_JUDGE
    assert jobs.judge.seen == 0 and len(jobs.calls) == 2
    assert not [f for f in os.listdir(os.path.join(runner.folder, "images")) if "legibility" in f]


def test_a_job_with_a_judge_and_no_floor_is_measured_without_redraws(jobs):
    runner = jobs.make(JobRequest(**SET).model_dump(mode="json"))
    runner._run()
    _, manifest = _ended(runner)
    assert manifest["quality"]["redraws"] == [] and manifest["quality"]["legibility"]["min_legibility"] is None
    assert [i["legibility"] for i in manifest["items"]] == [0.0, 1.0, 1.0, 0.0] and len(jobs.calls) == 2


def test_a_job_resumed_by_a_server_with_another_judge_or_none_fails_in_one_line():
    from emoji_ldm.errors import UserError
    from emoji_ldm.serve.jobs.files import job_judge

    assert job_judge({"judge": "/judges/one"}, "/judges/one") == "/judges/one"
    assert job_judge({}, "/judges/one") == "" and job_judge({"judge": ""}, "") == ""  # made without one: stays so
    with pytest.raises(UserError, match=r"measured by the judge '/judges/one', but .* has 'none'"):
        job_judge({"judge": "/judges/one"}, "")


def test_a_body_without_a_floor_hashes_as_before_jobs_took_one():
    still = JobRequest(prompts=["a cat"]).model_dump(mode="json")
    assert "min_legibility" not in still and "max_redraws" not in still
    asked = JobRequest(prompts=["a cat"], min_legibility=0.4, max_redraws=1).model_dump(mode="json")
    assert JobRequest.model_validate(asked).min_legibility == 0.4 and asked["max_redraws"] == 1


# --- POST /v1/jobs -------------------------------------------------------------------------------------------------


def test_min_legibility_on_a_server_without_a_judge_is_a_409_and_starts_no_job(jobs_api):  # noqa: F811
    status, answer = jobs_api.post({**SET, "min_legibility": 0.5})
    assert status == 409 and answer["field"] == "min_legibility", answer
    assert "no judge" in answer["error"] and jobs_api.started == []
    status, answer = jobs_api.post({**SET, "min_legibility": 0.5, "max_redraws": 1}, judge="/judges/one")
    assert status == 202, answer
    spec = jobs_api.started[0]
    assert spec.judge == "/judges/one" and spec.body["min_legibility"] == 0.5 and spec.body["max_redraws"] == 1
    status, answer = jobs_api.post({**SET, "min_legibility": 1.5}, judge="/judges/one")
    assert status == 422 and answer["field"] == "min_legibility", answer
    assert np.isclose(JobRequest.model_validate(spec.body).min_legibility, 0.5)
