"""Retention deletes only the service's own expired output (serve/jobs/retention.py): names shaped like its job and
set ids, and a service whose sets or jobs location holds, or is inside, a model, a judge, an adapter, the key
file or the other location refuses to start. The finding: `--sets-uri demo-out` (the demo's output folder, which
holds the served model, a dataset and a run) had them all deleted after 7 days."""

from __future__ import annotations

import os
import time

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.serve.app import AppArgs
from emoji_ldm.serve.jobs.retention import expire_jobs, expire_sets

OLD = time.time() - 30 * 86400


def _tree(root, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (OLD, OLD))


def _left(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_sets_uri_on_the_demo_output_refuses_to_start(tmp_path):
    demo = tmp_path / "demo-out"
    _tree(demo, ["model/model_index.json", "data/_delta_log/0.json", "run/checkpoint.pt"])
    with pytest.raises(UserError, match="args.sets_uri .* overlaps model"):
        AppArgs(model=str(demo / "model"), sets_uri=str(demo))
    with pytest.raises(UserError, match="args.jobs_uri .* overlaps model"):
        AppArgs(model=str(demo / "model"), jobs_uri=str(demo / "model" / "jobs"))


@pytest.mark.parametrize("other", ["judge", "adapter", "keys", "jobs_uri"])
def test_every_thing_the_service_reads_and_each_other_are_kept_apart(tmp_path, other):
    model, sets = str(tmp_path / "model"), str(tmp_path / "out")
    extra = {"judge": {"judge": str(tmp_path / "out" / "judge")},
             "adapter": {"adapters": {"cat": str(tmp_path / "out" / "lora")}},
             "keys": {"keys": str(tmp_path / "out" / "keys.json")},
             "jobs_uri": {"jobs_uri": str(tmp_path / "out" / "jobs")}}[other]
    with pytest.raises(UserError, match="overlaps"):
        AppArgs(model=model, sets_uri=sets, **extra)


def test_a_symlink_is_judged_by_what_it_points_to(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    os.symlink(tmp_path / "models", tmp_path / "sets")
    with pytest.raises(UserError, match="overlaps model"):
        AppArgs(model=str(tmp_path / "models" / "m"), sets_uri=str(tmp_path / "sets"))


def test_apart_locations_start(tmp_path):
    args = AppArgs(model=str(tmp_path / "model"), sets_uri=str(tmp_path / "out" / "sets"),
                   jobs_uri=str(tmp_path / "out" / "jobs"), judge=str(tmp_path / "judge"),
                   adapters={"cat": str(tmp_path / "lora")})
    assert args.sets_uri.endswith("sets")
    AppArgs(model="s3://models/m", sets_uri="s3://models/m-sets")  # a shared prefix, not a shared folder


def test_expiry_deletes_only_names_shaped_like_its_own(tmp_path):
    """Whatever else an operator left in the sets and jobs folders stays, however old."""
    sets, jobs = tmp_path / "sets", tmp_path / "jobs"
    own_set, own_job = "set-20261101-000000-0123abcd", "key-0123456789abcdef/job-20261101-000000-0123abcd"
    _tree(sets, [f"{own_set}/manifest.json", "model/unet/weights.safetensors", "data/_delta_log/0.json",
                 "set-old/manifest.json"])
    _tree(jobs, [f"{own_job}/state.json", "key-0123456789abcdef/notes/a.txt", "backup/job-20261101-000000-1/x",
                 "_local/job-20261101-000000-00000001/state.json"])
    assert expire_sets(str(sets), 7) == 1
    assert expire_jobs(str(jobs), 7) == 2
    assert _left(sets) == ["data/_delta_log/0.json", "model/unet/weights.safetensors", "set-old/manifest.json"]
    assert _left(jobs) == ["backup/job-20261101-000000-1/x", "key-0123456789abcdef/notes/a.txt"]
