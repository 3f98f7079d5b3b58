"""A CLI run starts its own local Ray; on a busy machine the new node can miss Ray's hard-coded 30 s wait (three
`dataset build` runs starting at once on 2 cores did): it is started again once, and any other error is raised."""

from __future__ import annotations

import pytest

from emoji_ldm.runtime.connect import _start_local


class _Ray:
    def __init__(self, errors: list):
        self.errors, self.calls = errors, []

    def init(self, **kwargs):
        self.calls.append("init")
        if self.errors:
            raise self.errors.pop(0)

    def shutdown(self):
        self.calls.append("shutdown")


def test_a_node_that_timed_out_during_startup_is_started_again_once():
    ray = _Ray([Exception("The current node timed out during startup. This could happen because ...")])
    _start_local(ray, 2, {})
    assert ray.calls == ["init", "shutdown", "init"]


def test_a_second_timeout_or_another_error_is_raised():
    timeout = Exception("The current node timed out during startup.")
    with pytest.raises(Exception, match="timed out"):
        _start_local(_Ray([timeout, timeout]), 2, {})
    with pytest.raises(ValueError, match="bad address"):
        _start_local(_Ray([ValueError("bad address")]), 2, {})
