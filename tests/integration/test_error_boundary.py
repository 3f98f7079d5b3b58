"""A UserError raised inside a Ray task, a Ray Data UDF or a Ray Train worker reaches the user as one line."""

from __future__ import annotations

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


def test_user_error_in_a_train_worker(ray_local):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(_raise, scaling_config=ray.train.ScalingConfig(num_workers=1),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=ray.train.RunConfig(failure_config=ray.train.FailureConfig(max_failures=0)))
    error = _raised_by(trainer.fit)
    assert str(find_user_error(error)).splitlines()[0] == "--thing 'x' is wrong: use 'y'"


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
