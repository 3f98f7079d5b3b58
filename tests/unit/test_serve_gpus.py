"""Serving on any number of GPUs, without Ray or a GPU: the arithmetic of `emoji-ldm serve --gpus` (the Generator's
replicas at their most beside one job's drawer, placed as Ray places GPU shares), the one-line refusal and the
lowered max_replicas, the shared-path check, the pixel budget of a pipeline call on a replica and on a job's drawer,
and the drawer's warm-up of a compiled UNet. A stub Sampler records each pipeline call (images, size); `start()`
runs against a stubbed cluster (ray.nodes) and stops where Serve would start."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from PIL import Image
from starlette.requests import Request

from emoji_ldm.errors import UserError
from emoji_ldm.inference.animation import AnimationSettings
from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler
from emoji_ldm.serve.placement import check_gpu_share, fit_gpus, packs
from emoji_ldm.serve.run import ServeConfig
from emoji_ldm.serve.schemas import MAX_BATCH_PIXELS

REQUEST = Request({"type": "http", "headers": [], "method": "POST", "path": "/v1/generate"})


def generator(max_replicas: int = 2, gpus: float = 1.0, min_replicas: int = 1) -> list[dict]:
    return [{"name": "Generator", "autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas},
             "ray_actor_options": {"num_cpus": 1, "num_gpus": gpus}}, {"name": "Ingress"}]


# --- the GPU arithmetic ------------------------------------------------------------------------------------------


def test_ray_places_gpu_shares_out_of_one_gpu_and_whole_gpus_out_of_one_node():
    assert packs([0.5, 0.5], [1]) and not packs([0.5, 0.5, 0.5], [1]) and packs([0.33] * 3, [1])
    assert not packs([0.6, 0.6], [2 - 1]) and packs([0.6, 0.6], [2])  # two 0.6 shares never share a GPU
    assert packs([1, 0.5, 0.5], [1, 1]) and not packs([2], [1, 1]) and packs([2], [2])  # 2 GPUs: one node's
    assert packs([], []) and not packs([0.1], []) and packs([0, 0], [])


def test_one_gpu_with_jobs_is_refused_in_one_line_with_the_share_that_fits():
    with pytest.raises(UserError) as refused:
        fit_gpus(generator(2, 1.0), 1.0, [1])
    message = str(refused.value)
    assert "\n" not in message and "1 Generator replica(s) x 1 GPU + a job's drawer of 1 GPU" in message
    assert "1 GPU(s) on 1 node(s)" in message and "pass --gpus 0.5" in message
    with pytest.raises(UserError, match="this Ray cluster a GPU"):
        fit_gpus(generator(1, 1.0), 1.0, [])
    with pytest.raises(UserError, match="job_num_gpus 1:"):  # CPU replicas, a config's GPU drawer, no GPU
        fit_gpus(generator(2, 0.0), 1.0, [])


def test_max_replicas_is_lowered_to_what_fits_beside_a_drawer_and_left_when_it_fits():
    placed, note = fit_gpus(generator(2, 0.5), 0.5, [1])  # 2 x 0.5 + 0.5 > 1: one replica beside the drawer
    assert placed[0]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1}
    assert placed[0]["ray_actor_options"]["num_gpus"] == 0.5 and placed[1] == {"name": "Ingress"}
    assert "at most 1 replica(s) here, not 2: 2 x 0.5 GPU + a job's drawer of 0.5 GPU" in note
    placed, note = fit_gpus(generator(2, 1.0), 0.0, [1])  # no jobs: the replicas alone
    assert placed[0]["autoscaling_config"]["max_replicas"] == 1 and "not 2" in note
    deployments = generator(3, 1.0)
    assert fit_gpus(deployments, 1.0, [1, 1, 1, 1]) == (deployments, None)  # the RayService's 3 + 1 on 4 pods
    assert fit_gpus(generator(2, 0.33), 0.33, [1]) == (generator(2, 0.33), None)
    assert fit_gpus(generator(2, 0.0), 0.0, []) == (generator(2, 0.0), None)  # CPU serving: nothing to fit


def test_a_gpu_request_is_a_share_below_one_or_whole_gpus():
    check_gpu_share("--gpus", 0.5)
    check_gpu_share("--gpus", 2)
    with pytest.raises(UserError, match=r"--gpus 1.5: .* pass 1 or 2"):
        check_gpu_share("--gpus", 1.5)
    with pytest.raises(UserError, match="--gpus 1.5"):
        ServeConfig(model="/m", gpus=1.5)
    from emoji_ldm.serve.app import AppArgs

    with pytest.raises(UserError, match="args.job_num_gpus 2.5"):
        AppArgs(model="/m", job_num_gpus=2.5)


# --- `emoji-ldm serve` up to where Serve starts -------------------------------------------------------------------


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    """A model folder, and a stubbed cluster: `nodes` (the GPUs of each node) are what ray.nodes() reports; the
    application `start` would deploy is captured instead."""
    import ray
    from ray import serve

    from emoji_ldm.runtime import connect
    from emoji_ldm.serve import app, run

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    state = SimpleNamespace(nodes=[1.0], deployed=None, model=str(tmp_path / "model"), root=tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ("EMOJI_LDM_SHARED_PATHS", "EMOJI_LDM_MAX_GPUS", "KUBERAY_GEN_RAY_START_CMD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(connect, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(run, "_check_port_free", lambda host, port: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": g}}
                                               for g in state.nodes])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": sum(state.nodes)})
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "run", lambda application, **kwargs: None)
    monkeypatch.setattr(app, "application", lambda args, deployments: setattr(state, "deployed", (args, deployments)))
    return state


def test_serve_with_jobs_on_one_gpu_is_refused_unless_the_replicas_and_a_drawer_share_it(cluster, capsys):
    from emoji_ldm.serve.run import start

    jobs = str(cluster.root / "jobs")
    with pytest.raises(UserError, match=r"--gpus 1 with --jobs-uri: .*pass --gpus 0.5"):
        start(ServeConfig(model=cluster.model, gpus=1, jobs_uri=jobs))
    assert cluster.deployed is None
    start(ServeConfig(model=cluster.model, gpus=0.5, jobs_uri=jobs))
    args, deployments = cluster.deployed
    assert args["job_num_gpus"] == 0.5 and args["device"] == "cuda"
    assert deployments[0]["ray_actor_options"]["num_gpus"] == 0.5
    assert deployments[0]["autoscaling_config"]["max_replicas"] == 1  # the packaged config's 2 do not fit
    assert "the Generator scales to at most 1 replica(s) here" in capsys.readouterr().out


@pytest.mark.parametrize("env", [{"KUBERAY_GEN_RAY_START_CMD": "ray start --head --no-monitor"},
                                 {"EMOJI_LDM_MAX_GPUS": "3"}], ids=["kuberay-autoscaler", "declared-max"])
def test_serve_where_gpu_nodes_may_join_warns_and_lowers_nothing(cluster, capsys, monkeypatch, env):
    """KubeRay's autoscaler on (no maximum declared), or a declared maximum above the GPUs up now: nodes that
    ray.nodes() does not show yet may join, so a misfit is a warning."""
    from emoji_ldm.serve.run import start

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("EMOJI_LDM_SHARED_PATHS", str(cluster.root))  # where nodes may join, a shared model path
    start(ServeConfig(model=cluster.model, gpus=1, jobs_uri=str(cluster.root / "jobs")))
    _, deployments = cluster.deployed
    assert deployments[0]["autoscaling_config"]["max_replicas"] == 2
    assert "serve: warning: --gpus 1 with --jobs-uri: " in capsys.readouterr().out


def test_serve_joined_to_a_fixed_cluster_fits_what_it_sees(cluster, monkeypatch):
    """RAY_ADDRESS alone says nothing about growth: a fixed cluster (no autoscaler, no larger maximum declared) has
    the GPUs it shows, so a drawer that can never be placed is refused there too."""
    from emoji_ldm.serve.run import start

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("EMOJI_LDM_MAX_GPUS", "1")
    with pytest.raises(UserError, match=r"--gpus 1 with --jobs-uri: .*pass --gpus 0.5"):
        start(ServeConfig(model=cluster.model, gpus=1, jobs_uri=str(cluster.root / "jobs")))
    assert cluster.deployed is None


def test_serve_refuses_local_paths_on_a_multi_node_cluster(cluster):
    from emoji_ldm.serve.run import start

    cluster.nodes = [0.0, 0.0]
    with pytest.raises(UserError, match=r"the model \(--model\) is the local path .* 2 nodes"):
        start(ServeConfig(model=cluster.model))
    assert cluster.deployed is None
    cluster.nodes = [0.0]
    start(ServeConfig(model=cluster.model, jobs_uri=str(cluster.root / "jobs")))  # one node: local paths are fine
    assert cluster.deployed is not None


# --- the pixel budget of a pipeline call --------------------------------------------------------------------------


def stub_sampler(image_size: int = 64) -> Sampler:
    """A Sampler without a pipeline: each pipeline call is recorded in `drawn` as (images, size)."""
    sampler = object.__new__(Sampler)
    sampler.model_uri, sampler.content_id, sampler.image_size, sampler.calls, sampler.adapters = "/m", "c", \
        image_size, 0, {}
    sampler.guidance = 5.0  # the card's
    sampler.pipe = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(in_channels=4)))
    sampler.drawn = []

    def call(jobs, latents=None):
        images = sum(len(job.prompts) for job in jobs)
        sampler.drawn.append((images, jobs[0].size or image_size))
        return [Image.new("RGBA", (8, 8)) for _ in range(images)]

    sampler._call = call
    return sampler


def under_budget(drawn: list[tuple[int, int]]) -> bool:
    return all(images * size * size <= MAX_BATCH_PIXELS for images, size in drawn)


def test_a_replica_draws_a_batch_of_large_images_in_calls_under_the_pixel_budget():
    from emoji_ldm.serve.generator import Generator

    replica = object.__new__(Generator.func_or_class)
    replica.sampler, replica.png_metadata, replica.images, replica.batch_sizes = stub_sampler(), False, 0, []
    replica.max_batch_size, replica.max_batch_pixels = 16, MAX_BATCH_PIXELS
    # one @serve.batch of 16 images: 12 requests at 1024 px, 4 at the model's own size
    jobs = [SampleJob((f"big {i}",), (i,), steps=2, size=1024) for i in range(12)]
    jobs += [SampleJob((f"small {i}",), (i,), steps=2) for i in range(4)]
    made = replica._sample_pngs(jobs)
    assert [len(m) for m in made] == [1] * 16 and [m[0][1]["prompt"] for m in made] == [j.prompts[0] for j in jobs]
    assert under_budget(replica.sampler.drawn), replica.sampler.drawn
    assert sorted(replica.sampler.drawn) == [(4, 64), (4, 1024), (4, 1024), (4, 1024)]
    replica.sampler.drawn.clear()  # an animated loop: its frames in calls under the budget too
    loop = SampleJob(("spin",), (0,), steps=2, scheduler="ddim", size=1024, animation=AnimationSettings(8))
    replica._animate(loop)
    assert replica.sampler.drawn == [(4, 1024), (4, 1024)]


def test_a_request_at_the_models_own_size_counts_against_the_pixel_budget():
    from emoji_ldm.serve.app import Ingress
    from emoji_ldm.serve.errors import ApiError

    class Card:
        @staticmethod
        def remote():
            async def card():
                return {"uri": "/m", "image_size": 512}
            return card()

    cls = Ingress.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper
    ingress = object.__new__(cls)
    cls.__init__(ingress, SimpleNamespace(model_card=Card), {"model": "/m"})
    with pytest.raises(ApiError) as refused:  # 64 images with no size: 64 x 512^2
        asyncio.run(ingress._charge(REQUEST, 64, 25, None))
    assert refused.value.status == 422 and refused.value.field == "size"
    assert "64 images of 512 px (the model's own size) are 16777216 pixels" in refused.value.message
    assert "(4194304)" in refused.value.message
    asyncio.run(ingress._charge(REQUEST, 16, 25, None))  # 16 x 512^2: the budget itself
    ingress.args = ingress.args.__class__(model="/m", max_batch_pixels=256 * 256)  # an operator's smaller calls
    with pytest.raises(ApiError, match=r"one image of 512 px is .* \(65536, args.max_batch_pixels\): .* at most 256"):
        asyncio.run(ingress._charge(REQUEST, 1, 25, 512))
    asyncio.run(ingress._charge(REQUEST, 1, 25, None))  # the model's own size: drawn one image a call


@pytest.fixture
def drawers(monkeypatch):
    """Drawer's Sampler.load gives stub samplers (the list, in the order made)."""
    made = []

    def load(model, device="cpu", options=None):
        made.append(stub_sampler())
        return made[-1]

    monkeypatch.setattr(Sampler, "load", staticmethod(load))
    return made


def test_a_drawer_warms_up_its_compiled_unet_before_it_is_ready(drawers):
    from emoji_ldm.serve.jobs.runner import Drawer

    Drawer("/m", "cpu", InferenceOptions(compile=True), None, "")
    assert drawers[0].drawn == [(1, 64), (16, 64)]  # batch 1 and the largest chunk, before the first job's chunk
    Drawer("/m", "cpu", InferenceOptions(), None, "")
    assert drawers[1].drawn == []  # nothing to compile: nothing drawn


def test_a_job_at_a_large_size_is_drawn_in_chunks_under_the_pixel_budget(drawers, monkeypatch, tmp_path):
    import ray

    from emoji_ldm.serve.jobs.runner import Drawer, JobRunner
    from emoji_ldm.serve.jobs.store import JobSpec
    from emoji_ldm.serve.schemas import JobRequest

    class Actor:  # a Ray actor handle whose calls run here; an object ref is the value itself
        def __init__(self, obj):
            self.obj = obj

        def __getattr__(self, name):
            return SimpleNamespace(remote=lambda *args: getattr(self.obj, name)(*args))

    remote = SimpleNamespace(options=lambda **kw: SimpleNamespace(remote=lambda *a: Actor(Drawer(*a))))
    monkeypatch.setattr(ray, "remote", lambda cls: remote)
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (refs, []))
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    body = JobRequest(prompts=["a cat"], per_prompt=10, size=1024, steps=2).model_dump(mode="json")
    spec = JobSpec(str(tmp_path), "_local", "job-test-0001", body, "h", "/m")
    runner = object.__new__(JobRunner)
    runner.spec, runner.folder, runner.request, runner._cancel = spec, spec.folder, {"body": body}, threading.Event()
    state = {"done": 0, "state": "queued"}
    runner._draw(state)
    assert state["done"] == 10 and state["state"] == "running"
    assert drawers[0].drawn == [(4, 1024), (4, 1024), (2, 1024)] and under_budget(drawers[0].drawn)
