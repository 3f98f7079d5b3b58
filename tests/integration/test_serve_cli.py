"""`emoji-ldm serve` as a user runs it: its own local Ray, a set over HTTP, a clean SIGTERM; and its bad input."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import VENV_BIN, free_port, new_chrome, run_cli
from tests.serving import get, post, wait_for
from tests.tiny_models import tiny_model_with_card


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_model_with_card(tmp_path_factory.mktemp("cli") / "model"))


def new_key(keys: Path, name: str, *flags: str) -> str:
    made = run_cli("keys", "create", "--file", str(keys), "--name", name, *flags)
    assert made.returncode == 0, made.stderr
    return next(line for line in made.stdout.splitlines() if line.startswith("eml_"))


def test_serve_command_serves_a_set_and_stops_cleanly(model, tmp_path):
    """With API keys (from the environment, as a Kubernetes Secret mounted as a file is passed)."""
    keys = tmp_path / "keys.json"
    alice, bob, slow = new_key(keys, "alice"), new_key(keys, "bob"), new_key(keys, "slow", "--rate", "2")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "emoji-ldm"), "serve", "--model", model, "--port", str(port),
                             "--sets-uri", str(tmp_path / "sets")], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_ADDRESS": "", "EMOJI_LDM_API_KEYS": str(keys)},
                            start_new_session=True)
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
        body = {"theme": "blob", "items": ["happy", "sad"], "steps": 3}
        for headers in ({}, {"authorization": "Bearer eml_wrong"}, {"authorization": alice}):
            refused = post(url + "/v1/emoji-sets", body, headers=headers)
            assert refused.status == 401 and "API key" in refused.json()["error"], refused.data
            assert refused.headers["www-authenticate"].startswith("Bearer")
        assert get(url + "/v1/model").status == 401
        resp = post(url + "/v1/emoji-sets", body, headers={"authorization": f"Bearer {alice}"})
        assert resp.status == 200
        assert len([n for n in zipfile.ZipFile(io.BytesIO(resp.data)).namelist() if n.endswith(".png")]) == 3
        stored = post(url + "/v1/emoji-sets", {"theme": "blob", "items": ["happy"], "steps": 2, "store": True},
                      headers={"authorization": f"Bearer {bob}"})
        assert stored.status == 200 and (tmp_path / "sets" / stored.json()["id"] / "manifest.json").exists()
        # the web page: refused until the key is entered, then draws
        browser = new_chrome()
        driver = browser.driver
        try:
            driver.get(url + "/")
            WebDriverWait(driver, 30).until(lambda d: "API key" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "apikey").send_keys(alice + "\n")
            WebDriverWait(driver, 30).until(lambda d: "preset" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "count").clear()
            driver.find_element(By.ID, "count").send_keys("1")
            driver.find_element(By.ID, "generate").click()
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1)
        finally:
            browser.quit()
        # a rate of 2 a minute: the third request in a row is refused, with when to retry
        answers = [get(url + "/v1/model", headers={"authorization": f"Bearer {slow}"}) for _ in range(3)]
        assert [a.status for a in answers] == [200, 200, 429], [a.data for a in answers]
        assert int(answers[2].headers["retry-after"]) >= 1 and "rate" in answers[2].json()["error"]
        # revoked while serving: refused within the key file's reload interval
        assert run_cli("keys", "revoke", "--file", str(keys), "--name", "bob").returncode == 0
        wait_for(lambda: get(url + "/v1/model", headers={"authorization": f"Bearer {bob}"}).status == 401, 10,
                 "the revoked key to be refused")
        assert "eml_" not in (tmp_path / "serve.log").read_text(), "a key was logged"
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
    public = run_cli("serve", "--model", model, "--host", "0.0.0.0")
    assert public.returncode == 2 and "without API keys" in public.stderr and "--insecure" in public.stderr
    no_keys = run_cli("serve", "--model", model, "--keys", str(tmp_path / "keys.json"))
    assert no_keys.returncode == 2 and "has no keys" in no_keys.stderr
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


def test_the_app_builder_refuses_to_serve_without_keys_unless_insecure(tmp_path, monkeypatch):
    """`serve run` / `serve deploy` with the packaged config (http host 0.0.0.0) build the app through
    build_app, where `emoji-ldm serve`'s loopback check does not run: no keys there is a refusal, in one line."""
    import yaml

    from emoji_ldm.errors import UserError
    from emoji_ldm.serve.app import build_app
    from emoji_ldm.serve.run import default_config_path

    monkeypatch.delenv("EMOJI_LDM_API_KEYS", raising=False)
    packaged = yaml.safe_load(open(default_config_path()))["applications"][0]["args"]
    assert packaged["keys"] == "" and not packaged.get("insecure")
    with pytest.raises(UserError, match="refusing to serve without API keys") as refused:
        build_app(packaged)
    assert "\n" not in str(refused.value) and "insecure" in str(refused.value)
    build_app({**packaged, "insecure": True})  # the operator's explicit choice
    keys = tmp_path / "keys.json"
    new_key(keys, "alice")
    build_app({**packaged, "keys": str(keys)})
    monkeypatch.setenv("EMOJI_LDM_API_KEYS", str(keys))  # as the RayService passes a mounted Secret
    build_app(packaged)


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
