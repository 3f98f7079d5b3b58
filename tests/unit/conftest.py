"""`make test-fast` runs these: no Ray, no server, no browser. This guard fails a unit test that starts one
(ray.init, a listening socket, a ray / moto_server / Chromium process): such a test belongs in
tests/integration/."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

SERVER_PROGRAMS = {"ray", "moto_server", "chromium", "chromedriver", "emoji-ldm"}


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"a unit test must not {what}: move it to tests/integration/")

    return refused


@pytest.fixture(autouse=True)
def _no_ray_no_servers(monkeypatch):
    import ray
    import ray._private.worker

    monkeypatch.setattr(ray, "init", _refuse("start or join Ray (ray.init)"))
    monkeypatch.setattr(ray._private.worker, "init", _refuse("start or join Ray (ray.init)"))
    monkeypatch.setattr(socket.socket, "listen", _refuse("listen on a socket (a server)"))
    popen_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):
        program = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
        if os.path.basename(os.fsdecode(program).split()[0]) in SERVER_PROGRAMS:
            raise AssertionError(f"a unit test must not start {program!r}: move it to tests/integration/")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
