"""Lineage without Ray: PNG text chunks, recorded URIs, the weights' content id, and a chain over small
Delta tables written here with the commit metadata and model card the stages record."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from deltalake import write_deltalake
from deltalake.transaction import CommitProperties
from PIL import Image

from emoji_ldm.errors import UserError
from emoji_ldm.inference.pngmeta import encode_png, generation_params, read_params, shared_params
from emoji_ldm.lineage.command import LineageConfig, lineage_command
from emoji_ldm.lineage.text import format_chain
from emoji_ldm.lineage.trace import made_rows, trace
from emoji_ldm.store.artifacts import weights_content_id
from emoji_ldm.store.schema import EMOJI_SCHEMA
from emoji_ldm.store.uri import public_uri


def _params(**changes):
    base = dict(prompt="smiling cat face", seed=7, negative_prompt="blurry", steps=25, guidance=5, scheduler="ddim",
                width=32, height=32, model="/models/run/model", model_content_id="sha256:" + "ab" * 32)
    return generation_params(**{**base, **changes})


def test_png_chunks_round_trip_through_pil():
    params = _params()
    image = Image.open(io.BytesIO(encode_png(Image.new("RGB", (32, 32), "red"), params)))
    text = image.text
    assert read_params(text) == {**params, "guidance": 5.0}
    assert text["prompt"] == "smiling cat face" and text["seed"] == "7" and text["size"] == "32x32"
    assert text["model_content_id"].startswith("sha256:") and text["code_version"]
    # the one-chunk layout of the Stable Diffusion web UIs, for tools that read that
    assert text["parameters"].splitlines() == [
        "smiling cat face", "Negative prompt: blurry",
        "Steps: 25, Sampler: ddim, CFG scale: 5.0, Seed: 7, Size: 32x32, Model hash: ababababab, "
        f"Model: /models/run/model, Version: emoji-ldm {params['code_version']}"]
    assert sum(len(k) + len(v) for k, v in text.items()) < 1000  # small chunks, no configs


def test_png_chunks_non_latin1_prompt_and_off():
    params = _params(prompt="🐱 face, café", model_content_id=None)
    image = Image.open(io.BytesIO(encode_png(Image.new("RGB", (8, 8)), params)))
    assert image.text["prompt"] == "🐱 face, café" and "model_content_id" not in image.text  # iTXt
    assert Image.open(io.BytesIO(encode_png(Image.new("RGB", (8, 8)), None))).text == {}
    assert read_params({"seed": "x", "other": "y"}) == {"seed": "x"}


def test_shared_params_of_a_sheet():
    a, b = _params(prompt="a"), _params(prompt="b")
    shared = shared_params([a, b])
    assert "prompt" not in shared and shared["seed"] == 7 and shared["model"] == "/models/run/model"
    assert shared_params([]) == {}


def test_public_uri_drops_credentials():
    assert public_uri("s3://AKIA:secret@bucket/run/model") == "s3://bucket/run/model"
    assert public_uri("s3://bucket/x?X-Amz-Signature=abc") == "s3://bucket/x"
    assert public_uri("https://u:p@host/a.png?size=72&X-Amz-Credential=k&X-Amz-Signature=s") == \
        "https://host/a.png?size=72"
    assert public_uri("/data/twemoji") == "/data/twemoji" and public_uri("") == ""


def test_content_id_changes_when_the_weights_change(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name in ("a", "b"):
        (tmp_path / name / "unet").mkdir(parents=True)
        save_file({"w": torch.arange(6, dtype=torch.float32)}, tmp_path / name / "unet" / "model.safetensors")
        (tmp_path / name / "unet" / "config.json").write_text(json.dumps({"_name_or_path": f"/somewhere/{name}"}))
    first = weights_content_id(tmp_path / "a")
    assert first.startswith("sha256:") and len(first) == 7 + 64
    assert weights_content_id(tmp_path / "b") == first  # same weights, other config paths: the same id
    save_file({"w": torch.arange(6, dtype=torch.float32) * 1.0001}, tmp_path / "b" / "unet" / "model.safetensors")
    assert weights_content_id(tmp_path / "b") != first
    (tmp_path / "a" / "unet" / "model.safetensors").rename(tmp_path / "a" / "unet" / "other.safetensors")
    assert weights_content_id(tmp_path / "a") != first  # the layout counts too
    with pytest.raises(UserError, match="no weight files"):
        weights_content_id(tmp_path / "empty")


def _commit(uri, table, meta, mode="append"):
    write_deltalake(str(uri), table, mode=mode,
                    commit_properties=CommitProperties(custom_metadata={"emoji_ldm": json.dumps(meta)}))


def _rows(ids, caption=None):
    n = len(ids)
    return pa.table({"id": ids, "image": [b""] * n, "width": [32] * n, "height": [32] * n, "orig_width": [32] * n,
                     "orig_height": [32] * n, "orig_format": ["PNG"] * n, "source": ["twemoji"] * n,
                     "source_url": [f"https://x/{i}.png" for i in ids], "page_url": [None] * n,
                     "title": ids, "tag": ["t"] * n, "caption": [caption] * n, "caption_model": [None] * n,
                     "caption_prompt_id": [None] * n, "ingested_at": [None] * n}, schema=EMOJI_SCHEMA)


CONTENT_ID = "sha256:" + "ab" * 32  # the model content id of `_params`


@pytest.fixture
def model_run(tmp_path):
    """A demo as the stages record it under tmp_path/demo-out: a dataset (build, caption as overwrite), a latent
    table whose encode commit names the dataset version, and a model card with absolute URIs and a content id."""
    root = tmp_path / "demo-out"
    ds, lat, model = root / "twemoji", root / "latents", root / "run" / "model"
    _commit(ds, _rows(["a", "b"]), {"operation": "build", "source": "twemoji", "build_id": "b1", "message": "demo",
                                     "counts": {"in": 3, "added": 2, "rejected": {"too_small": 1}}})
    _commit(ds, _rows(["a", "b"], "a caption"), {"operation": "caption", "captioner": "metadata",
                                                 "caption_model": "metadata", "caption_prompt_id": "metadata-v1",
                                                 "counts": {"captioned": 2}}, mode="overwrite")
    latents = pa.table({"id": ["a"], "caption": ["a caption"], "split": ["train"]})
    _commit(lat, latents, {"operation": "encode", "source": f"{ds}@1", "dataset": str(ds), "dataset_version": 1,
                           "preset": {"name": "tiny"}, "vae": "v", "text_encoder": "minilm"})
    model.mkdir(parents=True)
    (model / "model_card.json").write_text(json.dumps({
        "preset": "tiny", "dataset": str(ds), "dataset_version": 1, "latent_table": str(lat),
        "latent_table_version": 0, "content_id": CONTENT_ID, "training": {"steps": 3, "workers": 1},
        "metrics": {"loss": 0.5}}))
    return root


def test_trace_from_a_png_to_the_dataset_commits(model_run, tmp_path):
    png = tmp_path / "made.png"
    png.write_bytes(encode_png(Image.new("RGB", (8, 8)), _params(model=str(model_run / "run" / "model"))))
    result = trace(str(png))
    assert result["complete"], result["missing"]
    image, model, latents, dataset = result["chain"]
    assert image["prompt"] == "smiling cat face" and image["model_content_id"] == CONTENT_ID
    assert model["uri"] == str(model_run / "run" / "model") and model["content_id"] == CONTENT_ID
    assert latents["uri"] == str(model_run / "latents") and latents["version"] == 0
    assert dataset["uri"] == str(model_run / "twemoji") and dataset["version"] == 1 and dataset["rows"] == 2
    build, caption = dataset["commits"]
    assert build["operation"] == "build" and build["source"] == "twemoji" and build["rejected"] == 1
    assert caption["captioner"] == "metadata" and caption["caption_prompt_id"] == "metadata-v1"
    text = format_chain(result)
    assert "build    twemoji: 3 in, 2 added, 1 rejected; build b1" in text and f"content id {CONTENT_ID}" in text
    assert trace(str(model_run / "run"))["chain"] == result["chain"][1:]  # from the run folder: the same links


def test_missing_links_stop_the_chain(model_run, tmp_path, capsys):
    stripped = tmp_path / "stripped.png"
    Image.new("RGB", (8, 8)).save(stripped)
    assert lineage_command(LineageConfig(target=str(stripped))) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("missing link: png -> model: ") and "metadata was stripped" in out

    gone = tmp_path / "gone.png"
    gone.write_bytes(encode_png(Image.new("RGB", (8, 8)), _params(model=str(tmp_path / "deleted-model"))))
    result = trace(str(gone))
    assert result["chain"][0]["prompt"] == "smiling cat face"
    assert result["missing"]["link"] == "model" and "deleted-model" in result["missing"]["reason"]

    replaced = tmp_path / "replaced.png"  # the card now has another content id than the image names
    card = model_run / "run" / "model" / "model_card.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "content_id": "sha256:" + "cd" * 32}))
    replaced.write_bytes(encode_png(Image.new("RGB", (8, 8)), _params(model=str(model_run / "run" / "model"))))
    result = trace(str(replaced))
    assert not result["complete"] and "it was replaced since" in result["missing"]["reason"]

    import shutil

    shutil.rmtree(model_run / "latents")
    result = trace(str(model_run / "run"))
    assert [link["link"] for link in result["chain"]] == ["model"] and result["missing"]["link"] == "latent table"

    with pytest.raises(UserError, match="is not a PNG, an emoji set"):
        trace(str(tmp_path))
    with pytest.raises(UserError, match="no file at"):
        trace(str(tmp_path / "nothing.png"))
    (tmp_path / "text.png").write_text("not a PNG")
    with pytest.raises(UserError, match="is not a readable PNG file"):
        trace(str(tmp_path / "text.png"))
    with pytest.raises(UserError, match="unknown version 9"):
        trace(f"{model_run / 'twemoji'}@9")


def test_restores_mark_the_commits_they_undid():
    import datetime as dt

    t = dt.datetime(2026, 1, 1)
    rows = [{"version": v, "time": t, "operation": op, "meta": meta} for v, op, meta in [
        (0, "build", {}), (1, "build", {}), (2, "caption", {}), (3, "restore", {"restored_version": 1}),
        (4, "caption", {})]]
    undone = {c["version"]: c.get("undone_by") for c in made_rows(rows)}
    assert undone == {0: None, 1: None, 2: 3, 3: None, 4: None}


def test_a_pixel_models_chain_says_it_has_no_vae():
    chain = [{"link": "latent_table", "uri": "/d/latents", "version": 0, "preset": "pixel32", "vae": None,
              "text_encoder": "minilm", "code_version": "0.1.0"},
             {"link": "latent_table", "uri": "/d/latents", "version": 1, "preset": "tiny", "vae": "/d/vae",
              "text_encoder": "minilm", "code_version": "0.1.0"}]
    text = format_chain({"chain": chain, "missing": None})
    assert "encode with preset pixel32: no VAE (the model draws pixels), text encoder minilm" in text
    assert "encode with preset tiny: VAE /d/vae, text encoder minilm" in text


@pytest.fixture(scope="module")
def c2pa_keys():
    from emoji_ldm.inference.provenance import SigningKeys
    from emoji_ldm.lineage.provenance_cmd import make_dev_chain

    chain, key, _ = make_dev_chain()
    return SigningKeys(chain, key)


def test_lineage_verifies_a_signed_png_then_traces_it(model_run, tmp_path, capsys, c2pa_keys, monkeypatch):
    from emoji_ldm.inference.provenance import lineage_of, sign

    monkeypatch.delenv("EMOJI_LDM_C2PA_TRUST", raising=False)
    params = _params(model=str(model_run / "run" / "model"))
    png = tmp_path / "signed.png"
    png.write_bytes(sign(encode_png(Image.new("RGBA", (8, 8), "red"), params), "png", lineage_of(params), c2pa_keys))
    assert lineage_command(LineageConfig(target=str(png))) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('c2pa      signed by "emoji-ldm dev signer"') and "Valid" in out[0]
    assert "status: signingCredential.untrusted" in out[1] and f"model {CONTENT_ID}" in out[2]
    assert out[3].startswith("image     ")  # then the chain, as for any PNG
    assert lineage_command(LineageConfig(target=str(png), as_json=True)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["complete"] and result["provenance"]["valid"] and result["provenance"]["signed"]


def test_lineage_of_a_gif_is_its_c2pa_verification(tmp_path, capsys, c2pa_keys):
    from emoji_ldm.inference.provenance import sign

    frames = [Image.new("RGBA", (16, 16), (60 * i, 0, 0, 255)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    gif = tmp_path / "wave.gif"
    gif.write_bytes(sign(buf.getvalue(), "gif", {"seed": 2}, c2pa_keys))
    assert lineage_command(LineageConfig(target=str(gif))) == 0
    assert "seed 2" in capsys.readouterr().out

    data = bytearray(gif.read_bytes())
    tail = buf.getvalue()[-12:-2]  # the last frame's image data, before its block terminator and the trailer
    data[data.find(tail) + 4] ^= 0x01
    changed = tmp_path / "changed.gif"
    changed.write_bytes(bytes(data))
    assert lineage_command(LineageConfig(target=str(changed))) == 1
    assert "INVALID: the file or its manifest changed after signing" in capsys.readouterr().out

    plain = tmp_path / "plain.gif"
    plain.write_bytes(buf.getvalue())
    assert lineage_command(LineageConfig(target=str(plain))) == 1
    assert "no C2PA manifest" in capsys.readouterr().out
    with pytest.raises(UserError, match="no file at"):
        lineage_command(LineageConfig(target=str(tmp_path / "none.webp")))
