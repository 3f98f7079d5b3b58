"""The Serve app's `args:` are parsed strictly (serve/strict.py, `AppArgs`): `serve run module:build_app
insecure=false` hands over the string "false", which Python reads as true, so the app started without keys and
without its Host check. Every boolean and number takes its real value or one exact spelling; anything else, and
any unknown name, is refused at start."""

from __future__ import annotations

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.serve.app import AppArgs, build_app


def test_insecure_false_as_a_string_keeps_the_key_requirement(monkeypatch):
    monkeypatch.delenv("EMOJI_LDM_API_KEYS", raising=False)
    with pytest.raises(UserError, match="refusing to serve without API keys"):
        build_app({"model": "m", "insecure": "false"})
    with pytest.raises(UserError, match="refusing to serve without API keys"):
        build_app({"model": "m", "insecure": "False"})


@pytest.mark.parametrize("name", ["insecure", "compile", "channels_last", "png_metadata"])
def test_boolean_strings_mean_what_they_say(name):
    assert getattr(AppArgs(model="m", **{name: "false"}), name) is False
    assert getattr(AppArgs(model="m", **{name: "TRUE"}), name) is True


@pytest.mark.parametrize("name", ["insecure", "compile", "channels_last", "png_metadata"])
@pytest.mark.parametrize("value", ["no", "0", "", "off", "yes", 1, 0, None, "false "])
def test_anything_else_for_a_boolean_is_refused(name, value):
    with pytest.raises(UserError, match=f"args.{name} must be true or false"):
        AppArgs(model="m", **{name: value})


def test_numbers_take_their_values_or_exact_spellings():
    args = AppArgs(model="m", max_batch_size="8", batch_wait_timeout_s="0.01", retention_days="1.5",
                   job_num_cpus=2, webhook_allow="10.0.0.0/8, 192.168.0.0/16")
    assert args.max_batch_size == 8 and args.batch_wait_timeout_s == 0.01 and args.retention_days == 1.5
    assert args.job_num_cpus == 2.0 and args.webhook_allow == ("10.0.0.0/8", "192.168.0.0/16")


@pytest.mark.parametrize("name,value", [
    ("max_batch_size", "16.5"), ("max_batch_size", 16.5), ("max_batch_size", True), ("max_batch_size", "1e3"),
    ("max_batch_pixels", "lots"), ("retention_days", "nan"), ("retention_days", float("inf")),
    ("sweep_s", True), ("torch_threads", "4 "), ("model", 1), ("adapters", "a=b"), ("webhook_allow", [1]),
])
def test_bad_numbers_and_types_are_refused_naming_the_field(name, value):
    with pytest.raises(UserError, match=f"args.{name} must be"):
        AppArgs(**{"model": "m", name: value})


def test_an_unknown_arg_is_refused_not_ignored(monkeypatch):
    monkeypatch.delenv("EMOJI_LDM_API_KEYS", raising=False)
    with pytest.raises(UserError, match="unknown args: insecur"):
        build_app({"model": "m", "insecur": "true"})
