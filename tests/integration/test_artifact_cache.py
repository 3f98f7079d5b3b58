"""A model on S3 that several processes of one node load at once (ranks, replicas, actors) is downloaded once,
and each of them gets a complete copy."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.tiny_models import tiny_sd_pipeline

LOAD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from diffusers import StableDiffusionPipeline
from emoji_ldm.store.artifacts import local_copy
folder = local_copy(sys.argv[1])
StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
print("loaded", folder)
"""


def test_three_processes_load_one_s3_model_downloading_it_once(s3_server, tmp_path, caplog, monkeypatch):
    import logging
    import os

    from emoji_ldm.store.artifacts import local_copy

    s3_server.client().create_bucket(Bucket="cache-models")
    folder = tiny_sd_pipeline(tmp_path / "sd")
    for path in folder.rglob("*"):
        if path.is_file():
            s3_server.client().upload_file(str(path), "cache-models", f"m/{path.relative_to(folder)}")
    env = {**os.environ, **s3_server.env(), "EMOJI_LDM_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD, "s3://cache-models/m"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    logs = "".join(out for out, _ in outs)
    assert logs.count("downloading s3://cache-models/m") == 1, logs
    copies = {line.split()[1] for line in logs.splitlines() if line.startswith("loaded")}
    assert len(copies) == 1

    # a changed model (a new export to the same URI) is a new copy, not the stale one (here, in this process)
    s3_server.client().put_object(Bucket="cache-models", Key="m/unet/extra.txt", Body=b"changed")
    monkeypatch.setenv("EMOJI_LDM_CACHE", env["EMOJI_LDM_CACHE"])
    with caplog.at_level(logging.INFO):
        again = local_copy("s3://cache-models/m")
    assert "downloading s3://cache-models/m" in caplog.text and again not in copies
    assert (Path(again) / "unet" / "extra.txt").read_bytes() == b"changed"


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_file_rewritten_while_it_is_read_comes_back_whole(where, s3_server, tmp_path):
    """A job's state.json is rewritten after every chunk while GET /v1/jobs reads it: each read is one version,
    whole (pyarrow's S3 stream asked the size, then read a range of the next version: JSON cut at char 286)."""
    from emoji_ldm.store.artifacts import read_json, write_json

    if where == "s3":
        s3_server.client().create_bucket(Bucket="rewrites")
        uri = "s3://rewrites/job/state.json"
    else:
        uri = str(tmp_path / "job" / "state.json")
    versions = [{"done": 0, "errors": []}, {"done": 1, "errors": ["e" * 3000]}]  # two sizes, as a state grows
    write_json(uri, versions[0])
    stop = threading.Event()

    def rewrite():
        i = 0
        while not stop.is_set():
            i += 1
            write_json(uri, versions[i % 2])

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads, deadline = [], time.monotonic() + 60
    try:  # 300 reads at least, and on until both versions were read (a loaded machine may run the writer late)
        while len(reads) < 300 or ({r["done"] for r in reads} != {0, 1} and time.monotonic() < deadline):
            reads.append(read_json(uri))
    finally:
        stop.set()
        writer.join()
    assert all(r in versions for r in reads)
    assert {r["done"] for r in reads} == {0, 1}  # it did read while the other version was written
