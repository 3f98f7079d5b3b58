"""Training end to end on real Ray Train + DeepSpeed (2 CPU workers, gloo), a few steps each."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from emoji_ldm.errors import UserError
from emoji_ldm.ingest.build import BuildConfig, build_dataset
from emoji_ldm.store.schema import EMOJI_SCHEMA
from emoji_ldm.train.encode import EncodeConfig, encode
from emoji_ldm.train.ldm import TrainConfig, train
from emoji_ldm.train.vae import VAETrainConfig, train_vae
from tests.conftest import FAST, png_bytes, run_cli, train_fast
from tests.tiny_models import tiny_clip, tiny_sd_pipeline, tiny_sd_vae


@pytest.fixture(scope="module")
def tiny(pipeline, ray_local):
    """The session's tiny pipeline (48 rows, a 4-step VAE, its latent table, a 4-step ZeRO-2 run)."""
    return pipeline


def test_tiny_pipeline_zero2_end_to_end(tiny):
    """The session's pipeline: VAE, latent table, and a ZeRO-2 run with its model, samples, metrics and
    TensorBoard events, loadable by diffusers."""
    from diffusers import StableDiffusionPipeline

    assert tiny.vae_card["dataset_version"] == 2 and tiny.vae_card["metrics"]["scaling_factor"] > 0
    assert tiny.encoded["rows"] == 48 and 0 < tiny.encoded["val"] < 48
    out, card = tiny.run, tiny.card
    assert card["training"] == {"workers": 2, "zero_stage": 2, "steps": 4, "global_batch": 8}
    assert card["dataset_version"] == 2 and card["latent_table_version"] == 0
    assert card["prompt_style"] == "metadata"  # the metadata captioner's captions: typed names are rewritten
    assert card["guidance"] == card["config"]["guidance"] == 5.0  # the preset's: what the Sampler draws it at
    # and train as two forms, the caption and its name form (what a typed name becomes): (K, L, D)
    assert {shape[:1] for shape in _text_shapes(tiny.encoded["out"])} == {(2,)}
    for name in ("model/model_index.json", "model/model_card.json", "config.json", "loss.png",
                 "samples/step-00000002.png", "samples/step-00000004.png"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["images_per_s"] > 0 for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    lineage = json.loads((out / "model" / "model_card.json").read_text())
    assert lineage["dataset"].endswith("ds") and lineage["code_version"]

    pipe = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None)
    image = pipe("red heart", num_inference_steps=2, height=32, width=32, output_type="pil").images[0]
    assert image.size == (32, 32) and image.mode == "RGBA"  # the 4-channel VAE's alpha, through plain diffusers

    # TensorBoard: rank 0's scalars and validation grids, readable by TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "train/images_per_s", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert [e.step for e in events.Images("validation/samples")] == [2, 4]


def test_generate_command(tiny, tmp_path, cli_in_process):
    """One `generate` process: the DDIM sampler, a sheet and its images, and a prompt longer than the text
    encoder takes (truncated, with a warning on stderr)."""
    out = tiny.run
    long_prompt = "a very happy smiling yellow cat face with big round eyes " * 6
    r = run_cli("generate", "--model", str(out), "--prompt", long_prompt, "--n", "2", "--steps", "3",
                "--scheduler", "ddim", "--out", str(tmp_path / "gen"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "gen" / "sheet.png").exists() and (tmp_path / "gen" / "001.png").exists()
    assert "truncated" in r.stderr, r.stderr
    code, err = cli_in_process("generate", "--model", str(out), "--prompt", "x", "--scheduler", "euler",
                               "--out", str(tmp_path))
    assert code == 2 and "sampler setting scheduler must be one of dpmpp, ddim, ddpm, got 'euler'" in err


def test_loss_falls_when_overfitting(tiny, tmp_path):
    """30 steps on the session's latent table (its training rows, a few batches of 12: each seen several times).
    The last 10 steps' mean loss has been about 0.43 of the first 10's at step 30 (0.39 at step 60)."""
    train_fast(tiny.lat, tmp_path / "run", max_steps=30, workers=1,
               overrides={"train.batch_size": 12, "train.lr": 2e-3, "train.caption_dropout": 0.0,
                          "train.checkpoint_every": 30})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_bad_inputs(tiny, tmp_path, cli_in_process):
    """Refused on the driver, before a worker starts, each in well under a second."""
    with pytest.raises(UserError, match="is not a latent table"):
        train(TrainConfig(data=tiny.ds, out=str(tmp_path / "x"), overrides=FAST))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to"):
        train(TrainConfig(data=tiny.lat, out=str(blocker / "run"), overrides=FAST))
    empty = tmp_path / "empty"
    write_deltalake(str(empty), pa.Table.from_pylist([], schema=EMOJI_SCHEMA))
    with pytest.raises(UserError, match="has no rows"):
        encode(EncodeConfig(dataset=str(empty), out=str(tmp_path / "lat"), vae=tiny.vae))
    nocap = tmp_path / "nocap"
    row = {name: None for name in EMOJI_SCHEMA.names}
    row.update(id="0" * 32, image=png_bytes(size=(32, 32)), width=32, height=32, title="", source="test")
    write_deltalake(str(nocap), pa.Table.from_pylist([row], schema=EMOJI_SCHEMA))
    with pytest.raises(UserError, match="no captions or titles"):
        encode(EncodeConfig(dataset=str(nocap), out=str(tmp_path / "lat"), vae=tiny.vae))
    with pytest.raises(UserError, match="unknown version 5"):
        encode(EncodeConfig(dataset=f"{tiny.ds}@5", out=str(tmp_path / "lat"), vae=tiny.vae))
    with pytest.raises(UserError, match="train-vae is only for presets"):
        train_vae(VAETrainConfig(dataset=tiny.ds, out=str(tmp_path / "v"), preset="emoji64"))
    # a mistake only a worker can see (a UNet it cannot load) is a UserError where the worker builds the UNet;
    # that a worker's UserError comes back from train() as itself, not retried, is what
    # test_error_boundary::test_user_error_on_one_rank_stops_every_rank runs (a Ray Train run here would cost 20 s)
    from emoji_ldm.models.builders import build_unet
    from emoji_ldm.models.presets import get_preset

    with pytest.raises(UserError, match="cannot load the UNet from .*no-such-unet"):
        build_unet(get_preset("tiny", {**FAST, "unet.pretrained": str(tmp_path / "no-such-unet")}))
    # more rows per micro batch than the table has: refused on the driver
    with pytest.raises(UserError, match="fewer than the micro batch 512 for each of the 2 workers"):
        train(TrainConfig(data=tiny.lat, out=str(tmp_path / "big"), batch_size=1024, overrides=FAST))
    code, err = cli_in_process("train", "--data", tiny.lat, "--out", str(tmp_path / "r"), "--zero-stage", "5")
    assert code == 2 and "--zero-stage must be 0, 1, 2 or 3, got 5" in err
    code, err = cli_in_process("train", "--data", tiny.lat, "--out", str(tmp_path / "r"), "--workers", "3")
    assert code == 2 and "not divisible by workers" in err


def test_emoji64_with_tiny_stand_ins(ray_local, tiny, tmp_path):
    """The seed's preset through its real loading paths: CLIP + SD-layout VAE from local folders."""
    clip, vae = tiny_clip(tmp_path / "clip"), tiny_sd_vae(tmp_path / "vae")
    sets = {"vae.pretrained": str(vae), "text.pretrained": str(clip), "text.hidden_size": "32", "image_size": 32,
            "unet.block_out_channels": "32,64", "unet.attention_head_dim": 4}
    encode(EncodeConfig(dataset=tiny.ds, out=str(tmp_path / "lat"), preset="emoji64", overrides=sets))
    card = train(TrainConfig(data=str(tmp_path / "lat"), out=str(tmp_path / "run"), preset="emoji64",
                             max_steps=2, workers=1, overrides={**FAST, **sets}))  # the loading paths, 1 worker
    assert card["preset"] == "emoji64" and card["vae"] == str(vae)
    assert (tmp_path / "run" / "model" / "text_encoder" / "config.json").exists()


@pytest.fixture(scope="module")
def sd_latents(tiny, tmp_path_factory):
    """A tiny SD-layout pipeline and the session dataset encoded with it under sd-finetune: one latent table for
    both fine-tune modes (encode reads only the VAE and text encoder)."""
    root = tmp_path_factory.mktemp("sd-finetune")
    sd = tiny_sd_pipeline(root / "sd")
    sets = {"unet.pretrained": str(sd), "vae.pretrained": str(sd), "text.pretrained": str(sd), "image_size": 32,
            "text.hidden_size": "none"}
    encode(EncodeConfig(dataset=tiny.ds, out=str(root / "lat"), preset="sd-finetune", overrides=sets))
    return str(root / "lat"), sets


@pytest.mark.parametrize("mode", ["attn2", "lora"])
def test_sd_finetune_with_tiny_stand_in(sd_latents, tmp_path, mode):
    from diffusers import StableDiffusionPipeline

    lat, sets = sd_latents
    sets = {**sets, "unet.finetune": mode, "unet.lora_rank": 4}
    overrides = {k: v for k, v in {**FAST, **sets}.items() if k != "unet.block_out_channels"}
    card = train(TrainConfig(data=lat, out=str(tmp_path / "run"), preset="sd-finetune",
                             max_steps=2, workers=2 if mode == "lora" else 1, overrides=overrides))  # LoRA under ZeRO-2
    assert card["config"]["unet"]["finetune"] == mode
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "model", safety_checker=None)
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())  # LoRA fused on export


def _text_shapes(latent_table: str) -> set[tuple]:
    from deltalake import DeltaTable

    return {tuple(s) for s in DeltaTable(latent_table).to_pyarrow_table(columns=["text_shape"]).column(0).to_pylist()}


def test_encode_is_incremental(ray_local, tiny, tmp_path, monkeypatch):
    """A new dataset version: only new or re-captioned rows are encoded; deleted ones leave the latent table.
    Its files hold latent_rows_per_file rows, not the few rows of whatever blocks the encoder made."""
    from deltalake import DeltaTable

    from emoji_ldm.store.delta import commit_meta
    from emoji_ldm.store.log import file_actions
    from emoji_ldm.train import encode as encode_module

    ds, lat = str(tmp_path / "ds"), str(tmp_path / "lat")
    build_dataset(BuildConfig(source="twemoji", out=ds, limit=24))
    monkeypatch.setattr(encode_module, "latent_rows_per_file", lambda preset: 24)
    first = encode(EncodeConfig(dataset=ds, out=lat, vae=tiny.vae, batch_size=2))  # 12 encoder batches
    assert (first["encoded"], first["removed"], first["incremental"]) == (24, 0, False)
    rows = file_actions(DeltaTable(lat)).column("num_records").to_pylist()
    assert sum(rows) == 24 and len(rows) <= 2, rows  # one block of 24 rows: a file per split (train, val)

    build_dataset(BuildConfig(source="twemoji", out=ds, limit=30))  # 6 more rows
    table = DeltaTable(ds)
    # two rows the first encode saw: one re-captioned, one deleted
    ids = sorted(DeltaTable(ds, version=0).to_pyarrow_table(columns=["id"]).column("id").to_pylist())
    table.update(predicate=f"id = '{ids[0]}'", updates={"caption": "'a brand new caption'"})
    DeltaTable(ds).delete(predicate=f"id = '{ids[1]}'")
    monkeypatch.setattr(encode_module, "DELETE_KEYS_PER_COMMIT", 1)  # a removal commit per stale key
    second = encode(EncodeConfig(dataset=ds, out=lat))
    assert (second["encoded"], second["removed"], second["incremental"]) == (7, 2, True)  # 6 new + 1 re-captioned
    phases = [commit_meta(h).get("phase") for h in DeltaTable(lat).history(3)]
    assert phases == [None, "remove", "remove"], phases  # newest first: the append, then one per stale key
    rows = DeltaTable(lat).to_pyarrow_table(columns=["id", "caption"]).to_pylist()
    assert len(rows) == 29 and len({r["id"] for r in rows}) == 29
    assert {"id": ids[0], "caption": "a brand new caption"} in rows and ids[1] not in {r["id"] for r in rows}

    again = encode(EncodeConfig(dataset=ds, out=lat))  # nothing changed since: nothing to encode
    assert (again["encoded"], again["removed"], again["rows"]) == (0, 0, 29)
    # a re-caption pass changes every caption: every row encoded again, in one overwriting version, no keys held
    DeltaTable(ds).update(updates={"caption": "concat(caption, ' (again)')"})
    recaptioned = encode(EncodeConfig(dataset=ds, out=lat))
    assert (recaptioned["encoded"], recaptioned["removed"], recaptioned["incremental"]) == (29, 29, False)
    assert recaptioned["version"] == again["version"] + 1 and recaptioned["rows"] == 29
    full = encode(EncodeConfig(dataset=ds, out=lat, vae=tiny.vae, full=True))
    assert (full["encoded"], full["incremental"], full["rows"]) == (29, False, 29)
    assert {len(shape) for shape in _text_shapes(lat)} == {2}  # titles, not metadata captions: one form, (L, D)
    # captions in the metadata captioner's form train as two forms (the caption, its name form): a table of
    # one form a row is encoded again whole, not row by row (its rows could not be stacked with the new ones)
    DeltaTable(ds).update(updates={"caption": "concat(title, ' emoji (smileys & emotion), yellow, on a "
                                              "transparent background')"})
    forms = encode(EncodeConfig(dataset=ds, out=lat))
    assert (forms["encoded"], forms["removed"], forms["incremental"]) == (29, 0, False)
    assert forms["vae"] == full["vae"] == tiny.vae  # the table's VAE again, no new one trained
    assert {shape[0] for shape in _text_shapes(lat)} == {2}
    with pytest.raises(UserError, match="pass --full"):
        encode(EncodeConfig(dataset=ds, out=lat, overrides={"text.max_length": "8"}))
