"""The bulk job: Ray Data model actors write PNGs and a Delta manifest (local and S3); re-runs skip done prompts."""

from __future__ import annotations

import os

import pytest

from emoji_ldm.inference.settings import SamplerSettings
from tests.serving import wait_for
from tests.tiny_models import tiny_model_with_card


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model whose card names its own guidance (2.5), as `pixel32`'s does."""
    return str(tiny_model_with_card(tmp_path_factory.mktemp("bulk") / "model", guidance=2.5))


def manifest(uri: str):
    from emoji_ldm.store.delta import open_table

    table = open_table(uri)
    return table.version(), table.to_pyarrow_table().to_pylist()


def commit_workers(expected: int) -> list[int]:
    """The worker pids of this job's manifest-commit tasks (Ray's state API). The driver has their results, so
    they ran; each worker reports its pid when it starts the task. Not filtered on FINISHED: that event comes
    later, from a worker that exits right after the task (max_calls=1), and on a busy machine it went missing for
    over 30 s."""
    import ray
    from ray.util.state import list_tasks

    job = ray.get_runtime_context().get_job_id()

    def ran() -> list[int] | None:
        tasks = list_tasks(filters=[("name", "=", "_commit_chunk"), ("job_id", "=", job)], detail=True,
                           raise_on_missing_output=False)
        pids = [t.worker_pid for t in tasks if t.worker_pid]
        return pids if len(pids) >= expected else None

    return wait_for(ran, 90, f"{expected} manifest-commit tasks with their worker's pid")


def test_bulk_writes_images_and_manifest_and_resumes(s3_server, ray_local, model, tmp_path):
    from emoji_ldm.inference.bulk import BulkConfig, bulk_generate
    from emoji_ldm.store.artifacts import exists

    prompts = tmp_path / "prompts.txt"
    names = [f"face number {i}" for i in range(7)]
    prompts.write_text("# emoji to make\n" + "\n".join(names + ["face number 0", ""]) + "\n")
    out = str(tmp_path / "bulk")
    config = BulkConfig(model=model, prompts=str(prompts), out=out, sampler=SamplerSettings(count=2, steps=3),
                        batch_size=4, chunk_size=6)
    summary = bulk_generate(config)
    assert summary["images"] == 14 and summary["skipped"] == 0
    version, rows = manifest(f"{out}/manifest")
    # batches of 2 prompts = 4 images stream in; a commit once 6 or more are pending: 8, then the last 6
    assert summary["commits"] == version + 1 and 2 <= summary["commits"] <= 3
    assert len(rows) == 14 and {r["prompt"] for r in rows} == set(names)
    assert sorted((r["prompt"], r["index"], r["seed"]) for r in rows if r["prompt"] == "face number 3") == [
        ("face number 3", 0, 0), ("face number 3", 1, 1)]
    assert all(exists(r["uri"]) and r["width"] == 32 for r in rows)
    assert {r["guidance"] for r in rows} == {2.5}  # no --guidance: the model's own, as drawn
    # each commit ran as a task on its own fresh worker, never in the driver: a process that commits again and
    # again grows with the manifest's commits (bench/manifest_commits.py)
    pids = commit_workers(summary["commits"])
    assert len(set(pids)) == summary["commits"] and os.getpid() not in pids

    again = bulk_generate(config)
    assert again["images"] == 0 and again["skipped"] == 7
    assert manifest(f"{out}/manifest")[0] == version  # nothing new, no new version

    prompts.write_text("\n".join(names + ["a new face", "another new face"]))
    more = bulk_generate(config)
    assert more["images"] == 4 and more["skipped"] == 7
    assert len(manifest(f"{out}/manifest")[1]) == 18


@pytest.mark.s3
def test_bulk_to_s3_from_a_csv(s3_server, ray_local, model, tmp_path):
    from emoji_ldm.inference.bulk import BulkConfig, bulk_generate

    s3_server.client().create_bucket(Bucket="bulk")
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,notes\nred heart,x\nblue heart,y\n")
    bulk_generate(BulkConfig(model=model, prompts=str(csv), out="s3://bulk/run",
                             sampler=SamplerSettings(count=3, steps=2), target="slack"))
    _, rows = manifest("s3://bulk/run/manifest")
    assert len(rows) == 6 and all(r["uri"].startswith("s3://bulk/run/images/") for r in rows)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="bulk", Prefix="run/images/")["Contents"]]
    assert len(keys) == 6
    # ready for Slack: 128 x 128 RGBA under 128 KB, upload names unique per prompt, an alias each
    names = sorted(r["name"] for r in rows)
    assert names == ["blue_heart", "blue_heart_2", "blue_heart_3", "red_heart", "red_heart_2", "red_heart_3"]
    assert all(r["alias"] == f":{r['name']}:" and r["target"] == "slack" for r in rows)
    import io

    from PIL import Image

    body = s3_server.client().get_object(Bucket="bulk", Key=keys[0])["Body"].read()
    assert len(body) <= 128 * 1024 and Image.open(io.BytesIO(body)).size == (128, 128)
    assert Image.open(io.BytesIO(body)).mode in ("RGBA", "P")


def test_bulk_animated_loops_record_the_loop_and_the_file(ray_local, model, tmp_path):
    import io
    import json

    from PIL import Image

    from emoji_ldm.inference.animation import AnimationSettings
    from emoji_ldm.inference.bulk import BulkConfig, bulk_generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red heart\nspinning star\n")
    out = str(tmp_path / "loops")
    summary = bulk_generate(BulkConfig(model=model, prompts=str(prompts), out=out, target="slack",
                                       sampler=SamplerSettings(count=1, steps=2), batch_size=4,
                                       animation=AnimationSettings(frames=6, format="webp")))
    assert summary["images"] == 2
    _, rows = manifest(f"{out}/manifest")
    for row in rows:
        assert row["uri"].endswith(".webp")
        data = open(row["uri"], "rb").read()
        loop, file = json.loads(row["loop"]), json.loads(row["file"])
        assert loop["frames"] == 6 and set(loop) >= {"motion", "fps", "path", "frame_change", "loop_closure"}
        assert file["format"] == "webp" and file["bytes"] == len(data) == row["png_bytes"] <= 128 * 1024
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "WEBP" and im.is_animated and im.n_frames == file["frames"] == 6
            assert im.size == (128, 128) and im.mode == "RGBA"


def test_bulk_bad_input(model, tmp_path, cli_in_process):
    good = tmp_path / "p.txt"
    good.write_text("red heart\n")
    nocol = tmp_path / "p.csv"
    nocol.write_text("text\nred heart\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    cases = [
        (["--model", model, "--prompts", str(nocol)], "no `prompt` column"),
        (["--model", model, "--prompts", str(empty)], "has no prompts"),
        (["--model", model, "--prompts", str(tmp_path / "missing.txt")], "does not exist"),
        (["--model", model, "--prompts", str(tmp_path / "p.json")], "use a .txt"),
        (["--model", str(tmp_path / "no-model"), "--prompts", str(good)], "no-model"),
        (["--model", model, "--prompts", str(good), "--scheduler", "euler"],
         "sampler setting scheduler must be one of dpmpp, ddim, ddpm, got 'euler'"),
        (["--model", model, "--prompts", str(good), "--per-prompt", "0"],
         "sampler setting count must be a whole number from 1 to 64, got 0"),
        (["--model", model, "--prompts", str(good), "--target", "teams"], "'teams'"),
        (["--model", model, "--prompts", str(good), "--frames", "1"], "frames must be 0 (a still image) or from 2"),
        (["--model", model, "--prompts", str(good), "--frames", str(10**9)], "got 1000000000"),
        (["--model", model, "--prompts", str(good), "--frames", "4", "--format", "mov"], "format must be one of"),
        (["--model", model, "--prompts", str(good), "--frames", "4", "--scheduler", "ddpm"],
         "deterministic sampler"),
    ]
    for args, message in cases:
        code, err = cli_in_process("bulk", *args, "--out", str(tmp_path / "out"))
        assert code == 2 and message in err, (args, err)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_pipeline_on_cpu(model, dtype):
    """The inference fast path on CPU: a half-precision UNet (fp16 keeps the VAE in fp32 and decodes there),
    channels-last, and images that agree with fp32's."""
    import numpy as np
    import torch

    from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler

    job = SampleJob(("red heart", "ghost"), (1, 2), "", 3, 4.0, scheduler=None)
    full = Sampler.load(model, options=InferenceOptions(dtype="fp32")).sample([job])[0]
    half = Sampler.load(model, options=InferenceOptions(dtype=dtype, channels_last=True))
    want = torch.float16 if dtype == "fp16" else torch.bfloat16
    assert half.pipe.unet.dtype == want and half.pipe.text_encoder.dtype == want
    assert half.pipe.vae.dtype == (torch.float32 if dtype == "fp16" else torch.bfloat16)
    images = half.sample([job])[0]
    assert [im.size for im in images] == [im.size for im in full]
    diff = np.abs(np.asarray(images[0], dtype=float) - np.asarray(full[0], dtype=float)).mean()
    assert diff < 40, diff  # the same picture, up to half-precision rounding (0-255 scale)


def test_compiled_unet_is_warmed_up_once(model, monkeypatch):
    """torch.compile of the UNet: the warm-up compiles, a request at the warmed-up size does not compile again.
    Whether a request compiles again is dynamo's (its guards), whatever backend builds the kernels: here
    aot_eager, which traces as inductor does but builds no C++ (inductor's kernels are `make gpu-check`'s
    sample-*-compile, with `DEVICE=cpu` its C++ ones)."""
    import torch._dynamo

    from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, backend="aot_eager", **kwargs))
    torch._dynamo.reset()
    sampler = Sampler.load(model, options=InferenceOptions(compile=True))
    assert sampler.warm_up((2,)) > 0
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    images = sampler.sample([SampleJob(("red heart", "ghost"), (1, 2), "", 2, 4.0, scheduler=None)])[0]
    assert len(images) == 2 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
