"""Animated durable jobs and `emoji-ldm serve --judge`, without Ray: a job's runner and Drawer in this process
(a stand-in `ray.remote` whose calls run here, as in test_serve_gpus.py) drawing with a real Sampler on a tiny RGBA
model; the /v1/jobs route called through its FastAPI app over ASGI (its JSON errors as a client sees them), with
the runner's start recorded instead of made; `start()` against a stubbed cluster."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import zipfile
from types import SimpleNamespace

import pytest
from PIL import Image

from emoji_ldm.errors import UserError
from emoji_ldm.inference.targets import TARGETS, Target
from emoji_ldm.serve.schemas import JobRequest
from tests.unit.test_serve_gpus import cluster  # noqa: F401 (the fixture)

RGBA_MODEL = {"dataset_mode": "RGBA", "vae_channels": 4, "alpha": "vae", "key_colour": None}
ANIMATED = dict(theme="emoji", items=["grinning cat", "red heart"], template="{item}", steps=2, seed=3,
                target="slack", animation={"frames": 4, "format": "gif"})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from tests.tiny_models import tiny_model_with_card

    return str(tiny_model_with_card(tmp_path_factory.mktemp("job-animation") / "model", RGBA_MODEL))


class _Actor:  # a Ray actor handle whose calls run here; an object ref is the value itself
    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        return SimpleNamespace(remote=lambda *args: getattr(self.obj, name)(*args))


@pytest.fixture
def runner_for(monkeypatch, model, tmp_path):
    """A JobRunner (not started) for a body, whose Drawer is made here; `loops` records each loop drawn."""
    import ray

    from emoji_ldm.inference.sampler import Sampler
    from emoji_ldm.serve.jobs.runner import Drawer, JobRunner
    from emoji_ldm.serve.jobs.store import JobSpec

    loops = []
    pngs = Sampler.pngs

    def counted(self, jobs, metadata=True, max_batch=None):
        loops.extend((p, s, j.animation.frames if j.animation else 0) for j in jobs for p, s in zip(j.prompts, j.seeds))
        return pngs(self, jobs, metadata, max_batch)

    monkeypatch.setattr(Sampler, "pngs", counted)
    remote = SimpleNamespace(options=lambda **kw: SimpleNamespace(remote=lambda *a: _Actor(Drawer(*a))))
    monkeypatch.setattr(ray, "remote", lambda cls: remote)
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (refs, []))
    monkeypatch.setattr(ray, "get", lambda ref: ref)

    def make(body: dict):
        spec = JobSpec(str(tmp_path), "_local", "job-test-0001", body, "h", model, max_batch_size=4)
        runner = object.__new__(JobRunner)
        runner.spec, runner.folder, runner._cancel = spec, spec.folder, threading.Event()
        runner.request = {"body": body, "created_at": "2026-11-26T00:00:00Z"}
        return runner

    make.loops = loops
    return make


def test_an_animated_job_packages_loops_under_the_cap_with_their_records_and_resumes_without_redrawing(runner_for):
    from emoji_ldm.serve.jobs.store import public_state

    body = JobRequest(**ANIMATED).model_dump(mode="json")
    runner = runner_for(body)
    state = {"done": 0}
    runner._draw(state)
    assert state["done"] == 2 and [f for _, _, f in runner_for.loops] == [4, 4]  # loops, as the sets draw them
    first = (runner.folder + "/images/00000.png")
    with open(first, "rb") as f:
        drawn = f.read()
    runner_for.loops.clear()
    state["done"] = 1  # a restart after the first chunk: only the second item is drawn again
    runner._draw(state)
    assert [p for p, _, _ in runner_for.loops] == ["red heart"] and state["done"] == 2
    with open(first, "rb") as f:
        assert f.read() == drawn

    runner._run()  # the state as a runner starts (done 2 of 2: nothing to draw), then the result
    with open(runner.folder + "/state.json") as f:
        ended = json.load(f)
    assert ended["state"] == "succeeded", ended["errors"]
    assert public_state(ended)["animation"]["format"] == "gif"
    with open(ended["result"]["manifest"]) as f:
        manifest = json.load(f)
    assert manifest["animation"]["frames"] == 4 and manifest["animation"]["format"] == "gif"
    with zipfile.ZipFile(ended["result"]["zip"]) as zf:
        for item in manifest["items"]:
            data = zf.read(f"job-test-0001/{item['file']}")
            assert item["file"].endswith(".gif") and len(data) <= 128 * 1024
            assert item["file_record"]["bytes"] == len(data) and item["file_record"]["format"] == "gif"
            assert set(item["metrics"]) == {"frame_change", "loop_closure", "flicker"}
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == "GIF" and im.n_frames == item["file_record"]["frames"] == 4
                assert im.size == (128, 128)


def test_the_job_state_names_the_loop_and_a_still_job_none():
    from emoji_ldm.serve.jobs.files import animation_state, items_per_chunk

    loop = animation_state(JobRequest(**ANIMATED))
    assert loop["frames"] == 4 and loop["format"] == "gif" and "noise circle" in loop["path"]
    still = JobRequest(prompts=["a cat"], per_prompt=8)
    assert animation_state(still) is None
    assert items_per_chunk(16, still) == 16 and items_per_chunk(16, JobRequest(**ANIMATED)) == 4
    assert items_per_chunk(2, JobRequest(**ANIMATED)) == 1  # a loop longer than a call: one loop a chunk


# --- POST /v1/jobs: bad animations are refused when submitted -----------------------------------------------------


async def _asgi_post(api, path: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "client": ("127.0.0.1", 1), "server": ("localhost", 80),
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]}
    sent, out = [{"type": "http.request", "body": data, "more_body": False}], []

    async def receive():
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    async def send(message):
        out.append(message)

    await api(scope, receive, send)
    status = next(m["status"] for m in out if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body"))


@pytest.fixture
def jobs_api(monkeypatch, tmp_path):
    """The /v1/jobs routes on a server with jobs: `post(body, judge="")` -> (status, JSON) from a server with that
    judge (empty: none); `started` holds the spec of each job put in the queue."""
    from emoji_ldm.serve.app import AppArgs
    from emoji_ldm.serve.http import new_api
    from emoji_ldm.serve.jobs.routes import JobRoutes

    started = []
    monkeypatch.setattr(JobRoutes, "_submit", lambda self, spec, *args: started.append(spec) or spec.body_hash)

    def post(body: dict, judge: str = ""):
        api = new_api(None, local_only=True)
        JobRoutes(AppArgs(model="/m", jobs_uri=str(tmp_path / "jobs"), judge=judge), None).add_to(api)
        return asyncio.run(_asgi_post(api, "/v1/jobs", body))

    return SimpleNamespace(post=post, started=started)


@pytest.mark.parametrize("animation, field, says", [
    ({"frames": 1}, "animation.frames", "frames must be 0 (a still image) or from 2 to 48, got 1"),
    ({"frames": 100000}, "animation.frames", "got 100000"),
    ({"frames": 8, "format": "mov"}, "animation.format", "format must be one of apng, gif, webp, got 'mov'"),
])
def test_a_bad_animation_is_a_422_naming_it_and_starts_no_job(jobs_api, animation, field, says):
    status, answer = jobs_api.post({**ANIMATED, "animation": animation})
    assert status == 422 and answer["field"] == field and says in answer["error"], answer
    assert jobs_api.started == []


def test_too_many_frames_for_one_job_is_a_422(jobs_api):
    status, answer = jobs_api.post({"prompts": ["a cat"] * 1000, "scheduler": "ddim",
                                    "animation": {"frames": 48}})
    assert status == 422 and "48000 frames to draw; at most 32768 per job" in answer["error"], answer
    assert jobs_api.started == []


def test_a_loop_that_cannot_fit_the_cap_is_a_422_at_submission(jobs_api, monkeypatch):
    monkeypatch.setitem(TARGETS, "slack", Target("slack", 128, 6000))
    status, answer = jobs_api.post(ANIMATED)
    assert status == 422 and answer["field"] == "animation", answer
    assert "a gif loop of 4 frames may not fit slack's 6000 bytes" in answer["error"]
    assert jobs_api.started == []


def test_a_good_animated_job_starts_with_its_animation_and_a_still_job_hashes_as_before(jobs_api):
    from emoji_ldm.serve.jobs.store import body_hash

    status, answer = jobs_api.post(ANIMATED)
    assert status == 202 and answer["state"] == "queued" and answer["kind"] == "set", answer
    assert answer["animation"]["frames"] == 4 and answer["animation"]["format"] == "gif"
    assert jobs_api.started[0].body["animation"]["frames"] == 4
    still = {k: v for k, v in ANIMATED.items() if k != "animation"}
    status, _ = jobs_api.post(still)
    assert status == 202 and "animation" not in jobs_api.started[1].body
    legacy = JobRequest(**still).model_dump(mode="json")
    JobRequest.model_validate(legacy)  # a still body validates again, as its runner reads it
    assert legacy.pop("animation") == {}
    assert jobs_api.started[1].body_hash == body_hash(legacy)


# --- emoji-ldm serve --judge ---------------------------------------------------------------------------------------


def test_serve_judge_reaches_the_app_args_and_is_checked_now(cluster, tmp_path):  # noqa: F811
    from emoji_ldm.serve.run import ServeConfig, start
    from tests.integration.test_serve_animation import tiny_judge

    judge = tiny_judge(tmp_path / "judge")
    start(ServeConfig(model=cluster.model, judge=judge))
    args, _ = cluster.deployed
    assert args["judge"] == judge
    with pytest.raises(UserError, match=r"--judge .*nothing: no judge.json there"):
        start(ServeConfig(model=cluster.model, judge=str(tmp_path / "nothing")))


def test_serve_judge_on_a_local_path_is_refused_on_a_multi_node_cluster(cluster, tmp_path, monkeypatch):  # noqa: F811
    from emoji_ldm.serve.run import ServeConfig, start
    from tests.integration.test_serve_animation import tiny_judge

    judge = tiny_judge(tmp_path / "judge")
    cluster.nodes = [0.0, 0.0]
    monkeypatch.setenv("EMOJI_LDM_SHARED_PATHS", cluster.model)  # the model is on shared storage, the judge not
    cluster.deployed = None
    with pytest.raises(UserError, match=r"the judge \(--judge\) is the local path .* 2 nodes"):
        start(ServeConfig(model=cluster.model, judge=judge))
    assert cluster.deployed is None


@pytest.mark.parametrize("size", [None, 512])
def test_a_job_over_the_pixels_one_job_may_hold_is_a_422(tmp_path, size):
    """One process packages a job's result, so a job holds at most 4096 images of 256 px (their frames counted):
    4096 of the model's own 512 px, asked for or by leaving `size` out, are refused before any work."""
    from starlette.requests import Request

    from emoji_ldm.serve.app import AppArgs
    from emoji_ldm.serve.errors import ApiError
    from emoji_ldm.serve.jobs.routes import JobRoutes
    from emoji_ldm.serve.limits import check_job_pixels

    async def card():
        return {"image_size": 512}

    routes = JobRoutes(AppArgs(model="/m", jobs_uri=str(tmp_path / "jobs"), max_batch_pixels=512 * 512), None, card)
    body = JobRequest(prompts=["a red heart"] * 64, per_prompt=64, **({"size": size} if size else {}))
    request = Request({"type": "http", "headers": [], "method": "POST", "path": "/v1/jobs"})
    with pytest.raises(ApiError, match="more than one job may hold") as refused:
        asyncio.run(routes.create_job(body, request))
    assert refused.value.status == 422 and refused.value.field == "size"
    check_job_pixels(4096, 256)  # the most a job holds
    with pytest.raises(ApiError, match="4097 images of 256 px"):
        check_job_pixels(4097, 256)
