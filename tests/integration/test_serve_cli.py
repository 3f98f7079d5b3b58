"""`emoji-ldm serve` as a user runs it: its own local Ray, a set over HTTP, a clean SIGTERM; and its bad input."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import zipfile

import pytest

from tests.conftest import VENV_BIN, free_port, run_cli
from tests.serving import get, post, wait_for
from tests.tiny_models import tiny_model_with_card


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_model_with_card(tmp_path_factory.mktemp("cli") / "model"))


def test_serve_command_serves_a_set_and_stops_cleanly(model, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "emoji-ldm"), "serve", "--model", model, "--port", str(port),
                             "--sets-uri", str(tmp_path / "sets")], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
            if "serving " not in (tmp_path / "serve.log").read_text():
                return False  # the command is up (and handles SIGTERM) once it says so
            try:
                return get(url + "/healthz").status == 200
            except Exception:
                return False

        wait_for(up, 180, "emoji-ldm serve to answer /healthz", every=1)
        resp = post(url + "/v1/emoji-sets", {"theme": "blob", "items": ["happy", "sad"], "steps": 3})
        assert resp.status == 200
        assert len([n for n in zipfile.ZipFile(io.BytesIO(resp.data)).namelist() if n.endswith(".png")]) == 3
        stored = post(url + "/v1/emoji-sets", {"theme": "blob", "items": ["happy"], "steps": 2, "store": True})
        assert stored.status == 200 and (tmp_path / "sets" / stored.json()["id"] / "manifest.json").exists()
    finally:
        proc.send_signal(signal.SIGTERM)  # what Kubernetes and process managers send; Ctrl-C is SIGINT
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0 and "serve: stopped" in output, output[-3000:]
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_serve_bad_input(model, tmp_path):
    missing = run_cli("serve", "--model", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "nope" in missing.stderr
    bad_port = run_cli("serve", "--model", model, "--port", "70000")
    assert bad_port.returncode == 2 and "--port" in bad_port.stderr
    bad_config = tmp_path / "serve.yaml"
    bad_config.write_text("applications: [{name: x, import_path: 5, deployments: nope}]\n")
    config = run_cli("serve", "--model", model, "--config", str(bad_config))
    assert config.returncode == 2 and "not a valid Serve config" in config.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = run_cli("serve", "--model", model, "--port", str(busy.getsockname()[1]))
    assert taken.returncode == 2 and "cannot listen" in taken.stderr


def test_app_args_refuse_bad_fast_path_settings():
    from emoji_ldm.errors import UserError
    from emoji_ldm.serve.app import AppArgs

    with pytest.raises(UserError, match="args.dtype must be one of auto, fp32, fp16, bf16, got 'fp8'"):
        AppArgs(model="/m", dtype="fp8")
    assert AppArgs(model="/m", dtype="bf16", channels_last=True, compile=True).inference().compile


def test_packaged_serve_config_validates_with_rays_schema():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from emoji_ldm.serve.run import default_config_path

    raw = yaml.safe_load(open(default_config_path()))
    ServeDeploySchema.model_validate(raw)
    app = raw["applications"][0]
    assert app["import_path"] == "emoji_ldm.serve.app:build_app"
    generator = next(d for d in app["deployments"] if d["name"] == "Generator")
    assert generator["max_queued_requests"] > 0 and generator["autoscaling_config"]["max_replicas"] >= 1
