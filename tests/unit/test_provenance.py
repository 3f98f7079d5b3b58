"""C2PA provenance: emoji (PNG, APNG, GIF, WebP) and sets signed with a dev certificate chain, read back with
c2pa-python's Reader; a changed pixel, a cap the manifest does not fit, and the operator's key files."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from emoji_ldm.errors import UserError
from emoji_ldm.inference.pngmeta import encode_png, generation_params
from emoji_ldm.inference.provenance import (
    DIGITAL_SOURCE_TYPE,
    LINEAGE_LABEL,
    UNTRUSTED,
    SigningKeys,
    lineage_of,
    sign,
    sign_set,
    signed_files,
    verify,
)
from emoji_ldm.inference.targets import TARGETS
from emoji_ldm.lineage.provenance_cmd import DevCertConfig, dev_cert, make_dev_chain

PROMPT = "smiling cat face"
CARD = {"content_id": "sha256:" + "ab" * 32, "latent_table": "s3://emoji/latents", "latent_table_version": 3,
        "dataset": "s3://emoji/twemoji", "dataset_version": 7}


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """`emoji-ldm provenance dev-cert`'s files and the keys they load as."""
    paths = dev_cert(DevCertConfig(out=str(tmp_path_factory.mktemp("dev-cert"))))
    return paths, SigningKeys.from_files(paths["chain"], paths["key"])


@pytest.fixture(autouse=True)
def _no_operator_trust(monkeypatch):
    monkeypatch.delenv("EMOJI_LDM_C2PA_TRUST", raising=False)


def _params(seed=1):
    return generation_params(prompt=PROMPT, seed=seed, negative_prompt="blurry", steps=25, guidance=5.0,
                             scheduler="dpmpp", width=32, height=32, model="s3://emoji/run/model",
                             model_content_id=CARD["content_id"])


def _frames(n=4, size=64):
    return [Image.new("RGBA", (size, size), (40 * i, 120, 200, 90 + 40 * i)) for i in range(n)]


def _encode(fmt: str) -> bytes:
    buf, frames = io.BytesIO(), _frames()
    if fmt == "png":
        return encode_png(frames[0], _params())
    kinds = {"apng": "PNG", "gif": "GIF", "webp": "WEBP"}
    extra = {"webp": {"lossless": True}, "gif": {"disposal": 2}}.get(fmt, {})
    frames[0].save(buf, kinds[fmt], save_all=True, append_images=frames[1:], duration=80, loop=0, **extra)
    return buf.getvalue()


def _active(data: bytes, mime: str = "image/png") -> dict:
    import c2pa

    with c2pa.Reader(mime, io.BytesIO(data)) as reader:
        store = json.loads(reader.json())
    return store["manifests"][store["active_manifest"]]


@pytest.mark.parametrize("fmt,mime", [("png", "image/png"), ("apng", "image/png"), ("gif", "image/gif"),
                                      ("webp", "image/webp")])
def test_each_format_signs_and_verifies_with_only_the_untrusted_notice(dev, fmt, mime):
    _, keys = dev
    data = _encode(fmt)
    signed = sign(data, fmt, lineage_of(_params(), CARD), keys, f"cat.{fmt}")
    result = verify(signed)
    assert result["signed"] and result["valid"] and result["embedded"] and result["state"] == "Valid"
    assert result["status"] == [UNTRUSTED]  # a dev certificate: nothing else
    assert result["signer"]["common_name"] == "emoji-ldm dev signer"
    lineage = result["lineage"]
    assert lineage["model_content_id"] == CARD["content_id"] and lineage["seed"] == 1
    assert lineage["latent_table"] == "s3://emoji/latents" and lineage["latent_table_version"] == 3
    assert lineage["prompt_sha256"] == __import__("hashlib").sha256(PROMPT.encode()).hexdigest()
    assert "prompt" not in lineage and PROMPT not in json.dumps(lineage)
    active = _active(signed, mime)
    actions = next(a for a in active["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert actions[0]["action"] == "c2pa.created" and actions[0]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert "thumbnail" not in active and any(a["label"] == LINEAGE_LABEL for a in active["assertions"])
    with Image.open(io.BytesIO(signed)) as image, Image.open(io.BytesIO(data)) as before:
        assert getattr(image, "n_frames", 1) == getattr(before, "n_frames", 1)  # an animated file still animates


def test_a_signed_apng_keeps_its_frames_and_timing(dev):
    _, keys = dev
    signed = sign(_encode("apng"), "apng", {"seed": 1}, keys)
    with Image.open(io.BytesIO(signed)) as image:
        assert image.is_animated and image.n_frames == 4
        durations = []
        for k in range(image.n_frames):
            image.seek(k)
            durations.append(image.info["duration"])
            assert image.convert("RGBA").getpixel((5, 5)) == _frames()[k].getpixel((5, 5))
    assert durations == [80] * 4
    assert verify(signed)["valid"]


def _change_one_pixel(png: bytes) -> bytes:
    """The RGBA PNG with its last pixel's red changed in its image data (decompressed, edited, recompressed, CRC
    made right): a well-formed PNG that every decoder reads, whose C2PA chunk is untouched. The last pixel,
    because PNG's row filters carry a change to the pixels right of and below it: it has none."""
    pos, chunks = 8, []
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        chunks.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]))
        pos += 12 + length
    raw = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))
    raw[-4] ^= 0x40  # the last pixel's red
    out, idat_done = [png[:8]], False
    for kind, body in chunks:
        if kind == b"IDAT":
            if idat_done:
                continue
            kind, body, idat_done = b"IDAT", zlib.compress(bytes(raw)), True
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def test_a_changed_pixel_fails_verification(dev):
    _, keys = dev
    signed = sign(_encode("png"), "png", {"seed": 1}, keys)
    changed = _change_one_pixel(signed)
    with Image.open(io.BytesIO(signed)) as a, Image.open(io.BytesIO(changed)) as b:
        w, h = a.size
        assert a.getpixel((w - 1, h - 1)) != b.getpixel((w - 1, h - 1))
        assert a.tobytes()[:-4] == b.tobytes()[:-4]  # every other pixel as it was (RGBA: 4 bytes a pixel)
    result = verify(changed)
    assert result["signed"] and not result["valid"] and result["state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in result["status"]


def test_the_dev_ca_as_a_trust_anchor_makes_it_trusted(dev, monkeypatch):
    paths, keys = dev
    signed = sign(_encode("gif"), "gif", {"seed": 1}, keys)
    monkeypatch.setenv("EMOJI_LDM_C2PA_TRUST", paths["ca"])
    result = verify(signed)
    assert result["trusted"] and result["state"] == "Trusted" and result["status"] == []
    other_ca = make_dev_chain()[2]  # another CA: the signer is not under it
    assert verify(signed, trust_pem=other_ca)["status"] == [UNTRUSTED]


def test_a_set_manifest_lists_its_emoji_as_ingredients(dev):
    _, keys = dev
    items = {f"cat_{i}.png": sign(encode_png(_frames()[i], _params(seed=9)), "png", lineage_of(_params(9), CARD),
                                  keys, f"cat_{i}.png") for i in range(3)}
    sheet = encode_png(Image.new("RGB", (96 * 3, 112), "white"))
    signed = sign_set(sheet, items, {"set_id": "set-1", "model_content_id": CARD["content_id"], "seed": 9}, keys)
    result = verify(signed)
    assert result["valid"] and result["status"] == [UNTRUSTED] and result["lineage"]["set_id"] == "set-1"
    assert [i["title"] for i in result["ingredients"]] == list(items)
    assert all(i["signed"] and i["status"] == [UNTRUSTED] and i["relationship"] == "componentOf"
               for i in result["ingredients"])
    assert all("thumbnail" not in i for i in _active(signed)["ingredients"])


def _padded_png(total: int) -> bytes:
    """A 128 x 128 emoji PNG padded with a text chunk to `total` bytes."""
    base = encode_png(Image.new("RGBA", (128, 128), (250, 200, 0, 255)))
    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * (total - len(base) - len("padding") - 13))  # 12 bytes of chunk, 1 NUL
    buf = io.BytesIO()
    Image.open(io.BytesIO(base)).save(buf, "PNG", pnginfo=info)
    assert len(buf.getvalue()) == total
    return buf.getvalue()


def test_over_the_cap_the_manifest_goes_to_a_sidecar(dev, tmp_path):
    _, keys = dev
    slack = TARGETS["slack"]
    near = _padded_png(slack.max_bytes - 500)  # fits unsigned; a ~3.5 KB manifest takes it over
    files = signed_files("party_cat.png", near, {"seed": 4}, keys, slack)
    assert set(files) == {"party_cat.png", "party_cat.c2pa"} and files["party_cat.png"] == near
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = verify(tmp_path / "party_cat.png")  # finds its sidecar beside it
    assert result["valid"] and not result["embedded"] and result["status"] == [UNTRUSTED]
    placement = result["lineage"]["placement"]
    assert placement["manifest"] == "sidecar" and placement["sidecar"] == "party_cat.c2pa"
    assert f"over slack's cap of {slack.max_bytes}" in placement["reason"]
    assert not verify(near)["signed"]  # the file itself carries nothing
    (tmp_path / "party_cat.png").write_bytes(_change_one_pixel(near))
    assert not verify(tmp_path / "party_cat.png")["valid"]

    small = _padded_png(20_000)
    fits = signed_files("small.png", small, {"seed": 4}, keys, slack)
    assert list(fits) == ["small.png"] and len(fits["small.png"]) <= slack.max_bytes
    assert verify(fits["small.png"])["valid"]


def test_a_manifest_without_thumbnail_adds_a_few_kilobytes(dev):
    _, keys = dev
    emoji = encode_png(Image.new("RGBA", (128, 128), (250, 200, 0, 255)), _params())
    signed = sign(emoji, "png", lineage_of(_params(), CARD), keys, "cat.png")
    overhead = len(signed) - len(emoji)
    # c2pa's default thumbnail (a JPEG of the image) alone is tens of KB; ours is the claim, the lineage, the
    # signature and the two certificates
    assert 2_000 < overhead < 6_000, overhead


def test_keys_are_checked_where_they_come_in(dev, tmp_path):
    paths, keys = dev
    assert "BEGIN PRIVATE KEY" not in repr(keys) and keys.alg == "ES256"
    chain, key, ca = make_dev_chain()
    with pytest.raises(UserError, match="self-signed"):
        SigningKeys(ca, key)
    with pytest.raises(UserError, match="not the key of the first certificate"):
        SigningKeys(chain, open(paths["key"], "rb").read())
    with pytest.raises(UserError, match="not a PEM certificate chain"):
        SigningKeys(b"hello", key)
    env = {"EMOJI_LDM_C2PA_CERT": paths["chain"]}
    with pytest.raises(UserError, match="EMOJI_LDM_C2PA_KEY is not set"):
        SigningKeys.from_env(env)
    assert SigningKeys.from_env({}) is None
    assert SigningKeys.from_env({**env, "EMOJI_LDM_C2PA_KEY": paths["key"]}).cert_pem == keys.cert_pem
    with pytest.raises(UserError, match="carries only their sha256"):
        sign(_encode("png"), "png", {"prompt": PROMPT}, keys)
    with pytest.raises(UserError, match="cannot sign a 'jpeg'"):
        sign(_encode("png"), "jpeg", {}, keys)


def test_unsigned_and_unreadable_files(tmp_path):
    assert verify(_encode("webp"))["signed"] is False
    (tmp_path / "note.png").write_text("not an image")
    with pytest.raises(UserError, match="not a readable PNG, GIF or WebP"):
        verify(tmp_path / "note.png")
    with pytest.raises(UserError, match="cannot read"):
        verify(tmp_path / "missing.png")


def test_dev_cert_writes_an_owner_only_key_and_keeps_earlier_files(dev):
    import os
    import stat

    paths, _ = dev
    assert stat.S_IMODE(os.stat(paths["key"]).st_mode) == 0o600
    folder = os.path.dirname(paths["key"])
    with pytest.raises(UserError, match="already holds a dev certificate"):
        dev_cert(DevCertConfig(out=folder))
    with pytest.raises(UserError, match="--days"):
        DevCertConfig(out=folder, days=0)


def test_a_served_sets_files_are_signed_as_a_set(dev):
    """The files `serve.sets.set_files` makes for /v1/emoji-sets and durable jobs, signed by `sign_set_files`."""
    from emoji_ldm.inference.provenance import sign_set_files
    from emoji_ldm.serve.sets import set_files, set_manifest

    _, keys = dev
    items, prompts = ["cat", "dog"], ["cat face emoji", "dog face emoji"]
    params = [_params(seed=5) | {"prompt": p} for p in prompts]
    manifest = set_manifest("set-1", "pets", items, prompts, {"seed": 5}, CARD, "s3://emoji/run/model", "slack")
    files = set_files(manifest, [encode_png(f, p) for f, p in zip(_frames(2, 32), params)], params)
    signed = sign_set_files(files, manifest, params, keys, TARGETS["slack"])
    for item in manifest["items"]:
        result = verify(signed[item["file"]])
        assert result["valid"] and result["status"] == [UNTRUSTED] and len(signed[item["file"]]) <= 128 * 1024
        assert result["lineage"]["seed"] == 5 and result["lineage"]["latent_table_version"] == 3
        assert "cat face emoji" not in json.dumps(result["lineage"])
    sheet = verify(signed["sheet.png"])
    assert sheet["valid"] and [i["title"] for i in sheet["ingredients"]] == [i["file"] for i in manifest["items"]]
    assert sheet["lineage"]["set_id"] == "set-1" and sheet["lineage"]["model_content_id"] == CARD["content_id"]
    record = json.loads(signed["manifest.json"])["provenance"]
    assert record["sidecars"] == [] and "CN=emoji-ldm dev signer" in record["signer"]
    assert sign_set_files(files, manifest, params, None) is files  # no keys: as made
