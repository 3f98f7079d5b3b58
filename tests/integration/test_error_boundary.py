"""A UserError raised inside a Ray task, a Ray Data UDF or one Ray Train worker reaches the user as one line."""

from __future__ import annotations

import pytest

from emoji_ldm.cli import main as cli
from emoji_ldm.errors import UserError, find_user_error


def _raise(_=None):
    raise UserError("--thing 'x' is wrong: use 'y'")


def _raised_by(fn):
    try:
        fn()
    except Exception as e:  # the wrapper Ray puts around it
        return e
    raise AssertionError("nothing was raised")


def test_user_error_found_inside_ray_wrappers(ray_local):
    import ray
    import ray.data

    from emoji_ldm.runtime.connect import ensure_ray

    ensure_ray()  # joins the module's Ray and sets the project's Ray Data options
    task = _raised_by(lambda: ray.get(ray.remote(_raise).remote()))
    data = _raised_by(lambda: ray.data.range(4).map_batches(_raise).take(1))
    for wrapped in (task, data):
        assert type(wrapped) is not UserError  # Ray wrapped it (its text carries a traceback)
        found = find_user_error(wrapped)
        assert isinstance(found, UserError) and str(found).splitlines()[0] == "--thing 'x' is wrong: use 'y'"
    assert find_user_error(RuntimeError("a bug")) is None


def _rank1_user_error(run):
    """Rank 1 raises a UserError; rank 0 meanwhile waits in a collective that rank 1 never joins."""
    import ray.train
    import torch

    if ray.train.get_context().get_world_rank() == 1:
        raise UserError(f"--thing {run!r} is wrong: use 'y'\n(a second line the user does not need)")
    torch.distributed.all_reduce(torch.ones(1))


@pytest.mark.timeout(300)
def test_user_error_on_one_rank_stops_every_rank(ray_local, tmp_path):
    """A UserError on rank 1 alone, rank 0 in the next collective, through the harness's `runner.fit` (what
    every recipe runs on): the run stops with that one line, without waiting for the collective's timeout (the
    test's own timeout would end it), and with restarts allowed, none retries it."""
    from emoji_ldm.train import runner

    with pytest.raises(UserError) as raised:
        runner.fit(_rank1_user_error, "x", name="user-error", out=str(tmp_path / "run"), workers=2, use_gpu=False,
                   max_failures=2)
    assert str(raised.value) == "--thing 'x' is wrong: use 'y'"


def test_cli_prints_a_worker_user_error_as_one_line(ray_local, monkeypatch, capsys):
    import ray

    wrapped = _raised_by(lambda: ray.get(ray.remote(_raise).remote()))

    def build(config):
        raise wrapped

    monkeypatch.setattr("emoji_ldm.ingest.build.build_dataset", build)
    assert cli.main(["dataset", "build", "--source", "twemoji", "--out", "/tmp/unused"]) == 2
    assert capsys.readouterr().err == "emoji-ldm: error: --thing 'x' is wrong: use 'y'\n"


def test_the_test_process_stays_joined_across_modules(ray_local, ray_cluster):
    """`connect` (each module's `ray_local`) keeps a connection to the session's cluster: Ray reports its GCS at
    the node's IP, not the 127.0.0.1 it was joined at, and every module boundary used to shut the connection down
    and join again (a shutdown racing Ray's own threads once ended the whole pytest process)."""
    import ray

    from tests.conftest import connect

    job = ray.get_runtime_context().get_job_id()
    connect(ray_cluster)
    assert ray.get_runtime_context().get_job_id() == job, "connect() joined the same cluster again"
