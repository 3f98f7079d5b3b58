"""The command line: flags generated from the configs (frozen here), wiring and the error boundary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from emoji_ldm.cli import main as cli
from emoji_ldm.cli.commands import COMMANDS, STAGES, find, parse_config
from emoji_ldm.cli.options import flag_set
from emoji_ldm.errors import UserError

FROZEN = Path(__file__).with_name("cli_flags.json")


def current_flags() -> dict[str, dict[str, str]]:
    return {c.name: flag_set(c.config_class()) for c in COMMANDS}


def test_flag_set_is_frozen():
    """A change to any command's flags shows here as a diff: regenerate with EMOJI_LDM_FREEZE_FLAGS=1."""
    flags = current_flags()
    if os.environ.get("EMOJI_LDM_FREEZE_FLAGS"):
        FROZEN.write_text(json.dumps(flags, indent=1, sort_keys=True) + "\n")
    assert flags == json.loads(FROZEN.read_text())


def test_every_command_builds_its_parser_and_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli.main([*command.words, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"emoji-ldm {command.name}" in out and command.help.split(" (")[0][:30] in out.replace("\n", " ")


def test_command_words_select_one_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "dataset" in capsys.readouterr().out
    assert cli._selected(["-v", "dataset", "caption", "/x"]) is find(("dataset", "caption"))
    assert cli._selected(["train", "--data", "d"]) is find(("train",))
    assert cli._selected(["submit", "build", "--source", "twemoji"]) is find(("submit",))


def test_flags_map_onto_nested_config_fields():
    build = parse_config(STAGES["build"], ["--source", "twemoji", "--out", "/tmp/x", "--image-size", "32",
                                            "--timeout", "2.5", "--limit", "7"])
    assert build.image.size == 32 and build.fetch.timeout_s == 2.5 and build.limit == 7
    assert build.image.background is None and build.fetch.retries == 3  # defaults from the config

    crawl = parse_config(STAGES["crawl"], ["--profile", "discords", "--tag", "Blobs", "--out", "/tmp/x",
                                            "--ignore-robots", "--rate", "0", "--retries", "4"])
    assert crawl.robots is False and crawl.rate_per_host == 0 and crawl.retries == 4
    assert crawl.fetch.retries == 3  # the page retries flag is the crawl's own

    train = parse_config(STAGES["train"], ["--data", "/d", "--out", "/o", "--set", "train.lr=2e-4", "--set",
                                            "unet.finetune=lora", "--gpu", "--max-steps", "5",
                                            "--preset", "sd-finetune"])  # a partial fine-tune needs a pretrained UNet
    assert train.overrides == {"train.lr": "2e-4", "unet.finetune": "lora"} and train.use_gpu
    assert train.resolved_preset().train.max_steps == 5

    bulk = parse_config(STAGES["bulk"], ["--model", "/m", "--prompts", "/p.txt", "--out", "/o",
                                          "--per-prompt", "3", "--steps", "7", "--size", "64"])
    assert (bulk.sampler.count, bulk.sampler.steps, bulk.sampler.size) == (3, 7, 64)


@pytest.mark.parametrize("stage, argv, text", [
    ("build", ["--out", "/x"], "the following arguments are required: --source"),
    ("train", ["--data", "/d", "--out", "/o", "--max-stepz", "3"], "unrecognized arguments: --max-stepz 3"),
    ("train", ["--data", "/d", "--out", "/o", "--max-step", "3"], "unrecognized arguments"),  # no prefixes
    ("train", ["--data", "/d", "--out", "/o", "--zero-stage", "4"], "--zero-stage must be 0, 1, 2 or 3, got 4"),
    ("train", ["--data", "/d", "--out", "/o", "--set", "lr"], "--set 'lr' is not NAME=VALUE"),
    ("bulk", ["--model", "/m", "--prompts", "/p", "--out", "/o", "--steps", "0"],
     "sampler setting steps must be a whole number from 1 to 1000, got 0"),
    ("caption", ["/d", "--captioner", "blip"], "unknown captioner 'blip'"),
])
def test_bad_flags_are_one_user_error(stage, argv, text):
    with pytest.raises(UserError, match=text.replace("(", r"\(").replace(")", r"\)")):
        parse_config(STAGES[stage], argv)


def test_usage_error_and_user_error_exit_2_with_one_line(capsys):
    assert cli.main(["dataset", "build", "--source", "twemoji"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "emoji-ldm: error: the following arguments are required: --out"
    assert cli.main(["generate", "--model", "/m", "--prompt", "x", "--out", "/o", "--n", "65"]) == 2
    assert capsys.readouterr().err == ("emoji-ldm: error: sampler setting count must be a whole number from 1 "
                                       "to 64, got 65\n")


def test_ctrl_c_message_fits_the_command(monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("emoji_ldm.train.ldm.train", interrupted)
    assert cli.main(["train", "--data", "/d", "--out", "/o"]) == 130
    assert "re-run with --resume" in capsys.readouterr().err
    monkeypatch.setattr("emoji_ldm.cli.dataset.versions_text", interrupted)
    assert cli.main(["dataset", "versions", "/d"]) == 130
    err = capsys.readouterr().err
    assert "emoji-ldm dataset versions: interrupted" in err and "dataset stays" not in err


def test_the_cli_and_every_argument_check_load_no_heavy_library():
    """The import rule (docs/development.md): `emoji-ldm --help` loads none of torch, Ray, diffusers,
    transformers and DeepSpeed, and parsing every command's flags none but Ray (the stages' Delta sinks
    subclass Ray Data's `Datasink`). A fresh interpreter: this one has them all."""
    import subprocess
    import sys

    heavy = "('torch', 'ray', 'diffusers', 'transformers', 'deepspeed')"
    code = (f"import sys\nfrom emoji_ldm.cli import main\nprint(sorted(m for m in {heavy} if m in sys.modules))\n"
            "from emoji_ldm.cli.commands import COMMANDS\nfor c in COMMANDS: c.config_class()\n"
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "['ray']"]


def test_a_bug_raised_while_handling_a_user_error_keeps_its_traceback(monkeypatch, capsys):
    """Only what an exception explicitly wraps counts (`raise ... from`, Ray's `cause`), not the error that was
    being handled when it was raised (`__context__`): a bug in an `except UserError` block is a bug."""
    def build(config):
        try:
            raise UserError("--source 'x' is wrong")
        except UserError:
            return {}["a bug in the handler"]

    monkeypatch.setattr("emoji_ldm.ingest.build.build_dataset", build)
    with pytest.raises(KeyError, match="a bug in the handler"):
        cli.main(["dataset", "build", "--source", "twemoji", "--out", "/tmp/unused"])
    assert "emoji-ldm: error" not in capsys.readouterr().err


def test_find_user_error_follows_explicit_wrapping_only():
    from emoji_ldm.errors import find_user_error

    user = UserError("--n 0 must be 1 or more")
    try:
        raise RuntimeError("a wrapper") from user
    except RuntimeError as e:
        assert find_user_error(e) is user

    class TaskError(Exception):  # Ray's RayTaskError: the worker's exception as `cause`
        def __init__(self, cause):
            self.cause = cause

    class TrainFailed(Exception):  # Ray Train: rank -> the worker's exception
        def __init__(self, failures):
            self.worker_failures = failures

    assert find_user_error(TrainFailed({0: RuntimeError("ok"), 1: TaskError(user)})) is user
    try:
        try:
            raise user
        except UserError:
            [].pop()  # a bug while handling it
    except IndexError as e:
        assert e.__context__ is user and find_user_error(e) is None
    assert find_user_error(ValueError("a library's own")) is None


def test_user_error_is_not_a_value_error():
    """`except ValueError` around a parser or a library call must not swallow a UserError raised inside it."""
    with pytest.raises(UserError):
        try:
            raise UserError("--size 7 must be from 8 to 1024")
        except ValueError:
            pytest.fail("except ValueError caught a UserError")


@pytest.fixture
def dashboard(monkeypatch):
    """Ray's real JobSubmissionClient against a stand-in for the dashboard's Jobs API (no socket: its HTTP calls
    are answered here): /api/version, and the job 'here' (200), 'gone' (404), 'broken' (500 with '404' and
    'does not exist' in its text). Yields the address and the (method, path) of every request."""
    import requests
    from ray.dashboard.modules import dashboard_sdk

    url = "http://dashboard.test:8265"
    replies = {"/api/version": (200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"})),
               "/api/jobs/here": (200, json.dumps({"type": "SUBMISSION", "job_id": None, "submission_id": "here",
                                                   "entrypoint": "true", "status": "RUNNING"})),
               "/api/jobs/gone": (404, "Job gone does not exist"),
               "/api/jobs/broken": (500, "upstream said 404: does not exist")}
    asked = []

    def request(method, address, **kwargs):
        path = address.removeprefix(url)
        asked.append((method, path))
        response = requests.Response()
        response.status_code, body = replies.get(path, (599, "unexpected request"))
        response._content = body.encode()
        return response

    monkeypatch.setattr(dashboard_sdk.requests, "request", request)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    yield url, asked


def test_a_missing_ray_job_is_told_by_its_http_status(dashboard):
    from emoji_ldm.cli import submit

    url, asked = dashboard
    with pytest.raises(UserError, match=f"no job 'gone' on {url}; `emoji-ldm jobs list` shows them"):
        submit.job_logs(url, "gone")
    with pytest.raises(UserError, match="no job 'gone'"):
        submit.stop_job(url, "gone")
    assert ("POST", "/api/jobs/gone/stop") not in asked  # refused before asking to stop
    # any other failure is not a missing job, whatever its text says
    with pytest.raises(RuntimeError, match="status code 500") as e:
        submit.job_logs(url, "broken")
    assert not isinstance(e.value, UserError)
    submit.require_job(submit.connect(url), "here", url)


def test_submit_uploads_the_checkout_it_runs_from():
    from emoji_ldm.cli.submit import checkout_root

    assert checkout_root() == Path(__file__).resolve().parents[2]  # tests/unit/ -> the checkout
