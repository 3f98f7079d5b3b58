"""Lineage end to end on real Ray: a dataset of several versions (two builds, a caption pass), a latent
table, a 4-step model (the session's pipeline); PNGs from generate, bulk and the service carry their
parameters, and `lineage` goes from each back to the builds; `--row` finds one row's origin."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import pyarrow.compute as pc
import pytest
from PIL import Image

from emoji_ldm.errors import UserError
from emoji_ldm.inference.pngmeta import read_params
from emoji_ldm.inference.settings import SamplerSettings
from emoji_ldm.lineage.row import row_origin
from emoji_ldm.lineage.trace import trace
from emoji_ldm.store.artifacts import weights_content_id
from emoji_ldm.store.delta import open_table
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def made(pipeline, ray_local):
    """The session's pipeline: v0 build (44 Twemoji), v1 build (4 synthetic), v2 metadata caption pass -> a
    latent table -> a 4-step model."""
    return {"root": pipeline.root, "ds": pipeline.ds, "run": str(pipeline.run), "model": pipeline.model,
            "card": pipeline.card}


def _reaches_the_builds(result: dict, made: dict) -> None:
    assert result["complete"], result["missing"]
    links = [link["link"] for link in result["chain"]]
    assert links[-3:] == ["model", "latent_table", "dataset"], links
    model, dataset = result["chain"][-3], result["chain"][-1]
    assert model["uri"] == made["model"] and model["content_id"] == made["card"]["content_id"]
    assert dataset["uri"] == made["ds"] and dataset["version"] == 2
    ops = [(c["operation"], c.get("source") or c.get("captioner")) for c in dataset["commits"]]
    assert ops == [("build", "twemoji"), ("build", "synthetic:4:1"), ("caption", "metadata")]


def test_generate_pngs_carry_parameters_and_trace_to_the_builds(made, tmp_path, cli_in_process):
    card = made["card"]
    assert card["content_id"] == weights_content_id(made["model"]) and card["dataset"] == made["ds"]
    out = tmp_path / "gen"
    # `generate` in this process (it needs no Ray; test_training::test_generate_command runs it as a process)
    code, err = cli_in_process("generate", "--model", made["run"], "--prompt", "red heart", "--n", "2", "--steps",
                               "2", "--seed", "5", "--negative-prompt", "blue", "--out", str(out))
    assert code == 0, err
    text = Image.open(out / "001.png").text
    assert read_params(text) == {
        "prompt": "red heart", "negative_prompt": "blue", "seed": 6, "steps": 2, "guidance": 5.0,
        "scheduler": "dpmpp", "size": "32x32", "model": made["model"], "model_content_id": card["content_id"],
        "code_version": text["code_version"]}
    sheet = Image.open(out / "sheet.png").text  # what its images share: not their seeds
    assert sheet["model"] == made["model"] and sheet["prompt"] == "red heart" and "seed" not in sheet

    r = run_cli("lineage", str(out / "001.png"))
    assert r.returncode == 0, r.stderr
    assert '"red heart", negative "blue", seed 6, 2 steps' in r.stdout and "build    twemoji: 44 in" in r.stdout
    assert "build    synthetic:4:1" in r.stdout and "caption  captioner metadata" in r.stdout
    # the same command in this process (it reads files and Delta logs only: no Ray), its exit code and output
    code, _ = cli_in_process("lineage", "--json", str(out / "001.png"))
    assert code == 0
    _reaches_the_builds(json.loads(cli_in_process.out), made)

    stripped = tmp_path / "stripped.png"
    Image.open(out / "001.png").save(stripped)  # PIL writes no text chunks unless asked: metadata stripped
    code, _ = cli_in_process("lineage", str(stripped))
    assert code == 1 and cli_in_process.out.splitlines()[-1].startswith("missing link: png -> model: ")


def test_generate_signs_every_file_and_lineage_verifies_it(made, tmp_path, cli_in_process, monkeypatch):
    """With the operator's C2PA keys (a dev chain here), every file `generate` writes and its sheet carry a manifest
    that c2pa's Reader validates with only the untrusted-signer notice; `lineage` shows it before the chain."""
    from emoji_ldm.inference.generate import GenerateConfig, generate
    from emoji_ldm.inference.provenance import UNTRUSTED, verify
    from emoji_ldm.lineage.provenance_cmd import DevCertConfig, dev_cert

    keys = dev_cert(DevCertConfig(out=str(tmp_path / "c2pa")))
    monkeypatch.setenv("EMOJI_LDM_C2PA_CERT", keys["chain"])
    monkeypatch.setenv("EMOJI_LDM_C2PA_KEY", keys["key"])
    monkeypatch.delenv("EMOJI_LDM_C2PA_TRUST", raising=False)
    paths = generate(GenerateConfig(model=made["model"], prompt="red heart", out=str(tmp_path / "gen"),
                                    sampler=SamplerSettings(count=2, steps=1, seed=5), target="slack"))
    for path in [*paths, str(tmp_path / "gen" / "sheet.png")]:
        result = verify(path)
        assert result["valid"] and result["status"] == [UNTRUSTED], (path, result["status"])
        assert result["lineage"]["model_content_id"] == made["card"]["content_id"]
    assert [i["title"] for i in verify(tmp_path / "gen" / "sheet.png")["ingredients"]] == ["000.png", "001.png"]
    code, _ = cli_in_process("lineage", paths[1])
    assert code == 0 and cli_in_process.out.startswith('c2pa      signed by "emoji-ldm dev signer"')
    assert "seed 6" in cli_in_process.out and "build    twemoji: 44 in" in cli_in_process.out


def test_no_png_metadata_writes_bare_pngs(made, tmp_path):
    from emoji_ldm.inference.generate import GenerateConfig, generate

    paths = generate(GenerateConfig(model=made["model"], prompt="x", out=str(tmp_path),
                                    sampler=SamplerSettings(count=1, steps=1), png_metadata=False))
    assert Image.open(paths[0]).text == {} and Image.open(tmp_path / "sheet.png").text == {}
    assert trace(paths[0])["missing"]["link"] == "png -> model"


def test_bulk_pngs_carry_parameters_and_trace_to_the_builds(made, tmp_path):
    from emoji_ldm.inference.bulk import BulkConfig, bulk_generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red heart\nblue circle\n")
    out = str(tmp_path / "bulk")
    bulk_generate(BulkConfig(model=made["run"], prompts=str(prompts), out=out,
                             sampler=SamplerSettings(count=1, steps=2, seed=9)))
    rows = open_table(f"{out}/manifest").to_pyarrow_table(columns=["prompt", "seed", "uri"]).to_pylist()
    assert len(rows) == 2
    for row in rows:
        params = read_params(Image.open(row["uri"]).text)
        assert params["prompt"] == row["prompt"] and params["seed"] == row["seed"] == 9
        assert params["model_content_id"] == made["card"]["content_id"]
        _reaches_the_builds(trace(row["uri"]), made)
    result = trace(f"{out}/manifest")
    assert result["chain"][0]["link"] == "bulk_manifest"
    _reaches_the_builds(result, made)


def test_service_pngs_json_and_sets_trace_to_the_builds(made, tmp_path):
    from ray import serve

    from tests.serving import deploy, post

    url = deploy(made["model"])
    try:
        body = post(url + "/v1/generate", {"prompt": "red heart", "n": 2, "steps": 2, "seed": 3}).json()
        assert body["model"] == made["model"] and body["model_content_id"] == made["card"]["content_id"]
        for b64, meta in zip(body["images"], body["metadata"]):  # the JSON carries what the PNG's chunks hold
            png = tmp_path / f"{meta['seed']}.png"
            png.write_bytes(base64.b64decode(b64))
            assert read_params(Image.open(png).text) == meta and meta["prompt"] == "red heart"
        _reaches_the_builds(trace(str(png)), made)

        resp = post(url + "/v1/emoji-sets", {"theme": "cat", "items": ["happy", "sad"], "seed": 4, "steps": 2})
        assert resp.status == 200
        zipfile.ZipFile(io.BytesIO(resp.data)).extractall(tmp_path / "sets")
    finally:
        serve.shutdown()
    (folder,) = (tmp_path / "sets").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["uri"] == made["model"]
    assert manifest["model"]["content_id"] == made["card"]["content_id"]
    item = read_params(Image.open(folder / "001-sad.png").text)
    assert item["prompt"] == "sad cat" and item["seed"] == 4
    sheet = Image.open(folder / "sheet.png").text
    assert sheet["seed"] == "4" and "prompt" not in sheet
    for target in (folder, folder / "manifest.json", folder / "000-happy.png"):
        _reaches_the_builds(trace(str(target)), made)


def test_row_origin_through_builds_caption_and_restore(made, tmp_path, cli_in_process):
    import shutil

    from emoji_ldm.store.ops import restore

    ds = str(tmp_path / "ds")
    shutil.copytree(made["ds"], ds)  # the restore below writes a version: on a copy, the session's table is shared
    twemoji = open_table(f"{ds}@0").to_pyarrow_dataset().head(1, columns=["id"]).column("id")[0].as_py()
    v2 = open_table(f"{ds}@2").to_pyarrow_table(columns=["id", "source"])
    synthetic = v2.filter(pc.equal(v2.column("source"), "synthetic:4:1")).column("id")[0].as_py()

    origin = row_origin(ds, twemoji)
    assert origin["version"] == 2 and origin["arrived"]["version"] == 0
    assert origin["arrived"]["operation"] == "build" and origin["arrived"]["message"] == "first"
    assert [c["operation"] for c in origin["rewritten_by"]] == ["caption"]
    assert origin["caption_pass"]["captioner"] == "metadata" and origin["values"]["caption"]
    assert origin["values"]["source"] == "twemoji" and origin["values"]["source_url"].endswith(".png")
    assert origin["values"]["caption_model"] == "metadata"

    origin = row_origin(ds, synthetic)
    assert origin["arrived"]["version"] == 1 and origin["arrived"]["source"] == "synthetic:4:1"
    early = row_origin(f"{ds}@0", twemoji)
    assert early["arrived"]["version"] == 0 and early["rewritten_by"] == [] and early["values"]["caption"] is None
    with pytest.raises(UserError, match="is not in"):
        row_origin(f"{ds}@0", synthetic)

    assert restore(ds, 1) == 3  # the caption pass is undone; the row is back in its first file
    origin = row_origin(ds, twemoji)
    assert origin["arrived"]["version"] == 0 and origin["values"]["caption"] is None
    commits = trace(ds)["chain"][-1]["commits"]
    assert [(c["version"], c.get("undone_by")) for c in commits] == [(0, None), (1, None), (2, 3), (3, None)]
    r = run_cli("lineage", "--row", synthetic, ds)
    assert r.returncode == 0, r.stderr
    assert "arrived in  v1" in r.stdout and "synthetic:4:1" in r.stdout
    code, err = cli_in_process("lineage", "--row", "no-such-id", ds)
    assert code == 2 and "is not in" in err
