"""Hub weights from our own S3 (emoji_ldm.store.mirror): a model mirrored from a hub cache to S3 and pulled into an
empty cache loads with the hub switched off (HF_HUB_OFFLINE=1), as the pods run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.store.mirror import MirrorConfig, main, mirror_weights, pull_weights

MODEL = "acme/tiny-vae"
REVISION = "0123456789abcdef0123456789abcdef01234567"
FILES = {"config.json": b'{"_class_name": "AutoencoderKL"}', "vae/diffusion_pytorch_model.safetensors": b"\0" * 4096}


def hub_cache(root: Path) -> Path:
    """A hub cache holding MODEL as huggingface_hub lays it out: blobs by hash, snapshot files linking to them."""
    repo = root / ("models--" + MODEL.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    for name, data in FILES.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / REVISION / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def load_offline(cache: Path, filename: str) -> bytes:
    """What a pod does: hf_hub_download by hub id, in a process with HF_HUB_OFFLINE=1 (read when the hub imports)."""
    code = ("import sys; from huggingface_hub import hf_hub_download; "
            f"sys.stdout.write(open(hf_hub_download({MODEL!r}, {filename!r}), 'rb').read().hex())")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return bytes.fromhex(r.stdout)


def test_mirror_to_s3_and_pull_into_an_empty_cache_loads_offline(tmp_path, s3_server):
    s3_server.client().create_bucket(Bucket="weights-test")
    dest = "s3://weights-test/weights/hub"
    written = mirror_weights(MirrorConfig(dest, (MODEL,), cache_dir=str(hub_cache(tmp_path / "src")), offline=True))
    assert sorted(written) == sorted(["models--acme--tiny-vae/refs/main"] +
                                     [f"models--acme--tiny-vae/snapshots/{REVISION}/{n}" for n in FILES])
    cache = tmp_path / "pod-cache"
    assert pull_weights(dest, str(cache)) == len(FILES) + 1
    for name, data in FILES.items():
        assert load_offline(cache, name) == data
    assert pull_weights(dest, str(cache)) == 0, "a second pull copies nothing"
    assert not list(cache.rglob("*.part"))


def test_pull_from_an_empty_mirror_copies_nothing(tmp_path):
    assert pull_weights(str(tmp_path / "nothing-here"), str(tmp_path / "cache")) == 0


def test_a_model_missing_from_the_cache_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="acme/other is not in the hub cache"):
        mirror_weights(MirrorConfig(str(tmp_path / "out"), ("acme/other",), str(tmp_path / "empty"), offline=True))
    assert main(["push", str(tmp_path / "out"), "not-an-id", "--offline"]) == 2
    assert "'not-an-id' is not a hub model id" in capsys.readouterr().err
