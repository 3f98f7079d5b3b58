"""The service's C2PA provenance, in process through the Ingress's own app (no Ray): /v1/generate's files and a
set's files signed with the operator's keys, and POST /v1/verify behind the service's key check, body limit and
JSON errors."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from emoji_ldm.inference.pngmeta import encode_png, generation_params
from emoji_ldm.inference.provenance import CERT_ENV, KEY_ENV, UNTRUSTED
from emoji_ldm.lineage.provenance_cmd import DevCertConfig, dev_cert
from emoji_ldm.serve.http import MAX_BODY_BYTES
from emoji_ldm.serve.keys import KeyRing, KeysCreateConfig, create_command
from emoji_ldm.serve.schemas import GenerateRequest
from tests.unit.test_auth import call

CARD = {"uri": "s3://emoji/run/model", "content_id": "sha256:" + "cd" * 32, "image_size": 32}


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return dev_cert(DevCertConfig(out=str(tmp_path_factory.mktemp("dev-cert"))))


@pytest.fixture
def signing(dev, monkeypatch):
    monkeypatch.setenv(CERT_ENV, str(dev["chain"]))
    monkeypatch.setenv(KEY_ENV, str(dev["key"]))
    monkeypatch.delenv("EMOJI_LDM_C2PA_TRUST", raising=False)


def _png(seed: int = 3) -> tuple[bytes, dict]:
    params = generation_params(prompt="smiling cat face", seed=seed, negative_prompt="", steps=4, guidance=5.0,
                               scheduler="dpmpp", width=32, height=32, model=CARD["uri"],
                               model_content_id=CARD["content_id"])
    return encode_png(Image.new("RGBA", (32, 32), (200, 90, 40, 255)), params), params


def _ingress(keys: str = ""):
    from emoji_ldm.serve.app import Ingress

    class Generator:
        class model_card:
            @staticmethod
            async def remote():
                return CARD

    cls = Ingress.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper
    ingress = object.__new__(cls)
    cls.__init__(ingress, Generator(), {"model": "unused", "max_batch_size": 4})
    if keys:  # the key file with the in-process request meter (the Serve app asks the shared meter actor)
        ingress.keyring = KeyRing(keys)
    return ingress.__serve_build_asgi_app__()


def _verify(app, data: bytes, headers: dict | None = None):
    status, _, body = call(app, "POST", "/v1/verify", headers={"content-type": "image/png", **(headers or {})},
                           body=data)
    return status, json.loads(body)


def test_generate_files_are_signed_and_verify_through_the_route(signing):
    from emoji_ldm.serve.sets import finish_files

    made = finish_files([_png()], GenerateRequest(prompt="smiling cat face", target="slack"))
    signed, params = made[0]
    assert "c2pa_sidecar" not in params and len(signed) <= 128 * 1024
    status, report = _verify(_ingress(), signed)
    assert status == 200 and report["valid"] and report["status"] == [UNTRUSTED]
    assert report["lineage"]["seed"] == 3 and "smiling cat face" not in json.dumps(report["lineage"])
    with Image.open(io.BytesIO(signed)) as im:
        im.load()
        im.putpixel((5, 5), (0, 0, 0, 255))
        changed = io.BytesIO()
        im.save(changed, "PNG", pnginfo=None)
    # the manifest chunk is gone from a re-encoded file, so keep its bytes and change one pixel's IDAT instead
    status, report = _verify(_ingress(), _with_idat_of(signed, changed.getvalue()))
    assert status == 200 and report["signed"] and not report["valid"]


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    import struct

    out, at = [], 8
    while at < len(png):
        (size,), kind = struct.unpack(">I", png[at:at + 4]), png[at + 4:at + 8]
        out.append((kind, png[at:at + 12 + size]))
        at += 12 + size
    return out


def _with_idat_of(signed: bytes, other: bytes) -> bytes:
    """`signed` with its image data replaced by `other`'s (one pixel changed): its manifest now describes
    pixels the file no longer has."""
    idat = b"".join(raw for kind, raw in _chunks(other) if kind == b"IDAT")
    parts, placed = [signed[:8]], False
    for kind, raw in _chunks(signed):
        if kind == b"IDAT":
            if not placed:
                parts.append(idat)
                placed = True
            continue
        parts.append(raw)
    return b"".join(parts)


def test_without_operator_keys_generate_files_are_as_made(monkeypatch):
    from emoji_ldm.serve.sets import finish_files

    monkeypatch.delenv(CERT_ENV, raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)
    png, _ = _png()
    (file, _), = finish_files([(png, _png()[1])], GenerateRequest(prompt="smiling cat face"))
    status, report = _verify(_ingress(), file)
    assert status == 200 and report["signed"] is False and report["valid"] is False


def test_a_set_is_signed_with_its_items_as_ingredients(signing):
    from emoji_ldm.serve.sets import set_files, set_manifest

    (a, pa), (b, pb) = _png(5), _png(5)
    manifest = set_manifest("set-1", "pets", ["cat", "dog"], ["cat face", "dog face"], {"seed": 5}, CARD,
                            CARD["uri"], "slack")
    files = set_files(manifest, [a, b], [pa, pb])
    status, sheet = _verify(_ingress(), files["sheet.png"])
    assert status == 200 and sheet["valid"] and len(sheet["ingredients"]) == 2
    assert json.loads(files["manifest.json"])["provenance"]["sidecars"] == []


def test_verify_follows_the_services_rules(tmp_path):
    keys = str(tmp_path / "keys.json")
    key = create_command(KeysCreateConfig(file=keys, name="alice", rate=100_000)).splitlines()[2]
    app = _ingress(keys)
    png, _ = _png()
    status, body = _verify(app, png)
    assert status == 401 and "API key" in body["error"]
    auth = {"authorization": f"Bearer {key}"}
    assert _verify(app, png, auth)[0] == 200
    status, body = _verify(app, b"", auth)
    assert status == 422 and body["field"] == "body"
    status, body = _verify(app, b"not an image", auth)
    assert status == 422 and body["field"] == "body" and "not a PNG, APNG, GIF or WebP" in body["error"]
    status, body = _verify(app, png, {**auth, "x-c2pa-sidecar": "%%%"})
    assert status == 422 and body["field"] == "X-C2PA-Sidecar"
    status, body = _verify(app, png + b"\0" * MAX_BODY_BYTES, auth)
    assert status == 413 and "larger than" in body["error"]
    local = _ingress()  # no keys: a local server answers only localhost Hosts
    status, body = _verify(local, png, {"host": "attacker.example"})
    assert status == 403


def test_a_sidecar_in_the_header_verifies_an_unsigned_file(signing, dev):
    from emoji_ldm.inference.provenance import SigningKeys, lineage_of, signed_files
    from emoji_ldm.inference.targets import Target

    png, params = _png()
    keys = SigningKeys.from_files(dev["chain"], dev["key"])
    files = signed_files("emoji.png", png, lineage_of(params), keys, Target("tiny", 32, len(png) + 16))
    assert files["emoji.png"] == png and "emoji.c2pa" in files
    sidecar = base64.b64encode(files["emoji.c2pa"]).decode()
    status, report = _verify(_ingress(), png, {"x-c2pa-sidecar": sidecar})
    assert status == 200 and report["valid"] and report["embedded"] is False

