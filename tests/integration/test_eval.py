"""`eval` and `train-judge` on real Ray: every metric of the session's tiny model, the protocol's baselines on the
same captions, the frozen judge by default, and a judge trained on a dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emoji_ldm.eval.evaluate import EvalConfig, evaluate
from emoji_ldm.inference.settings import SamplerSettings
from emoji_ldm.ingest.build import BuildConfig, build_dataset
from tests.conftest import run_cli
from tests.tiny_models import tiny_clip_model


@pytest.fixture(scope="module")
def tiny(pipeline, ray_local):
    """The session's tiny pipeline (48 rows, a 4-step VAE, its latent table, a 4-step ZeRO-2 run)."""
    return pipeline


def _is_share(value: float, of: int) -> bool:
    return value * of == pytest.approx(round(value * of)) and 0 <= round(value * of) <= of


def test_eval_of_the_tiny_model(tiny, tmp_path, capsys):
    """Every metric on a tiny model, 2 samples per caption, with a judge trained on the same 48 rows (2 epochs:
    it runs, no quality). `train-judge` runs through the CLI in this process (already a driver of the session's
    Ray), which saves a Python start with torch."""
    from emoji_ldm.cli.main import main
    from emoji_ldm.eval.judge import load_judge

    assert main(["train-judge", "--data", tiny.ds, "--out", str(tmp_path / "judge"), "--label", "group",
                 "--epochs", "2", "--width", "8", "--min-class-rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "group classes from" in out and "a different judge as the frozen judge" in out, out
    judge_id = load_judge(str(tmp_path / "judge")).meta["content_id"]
    assert f"content id {judge_id}" in out
    report = evaluate(EvalConfig(model=str(tiny.run), data=tiny.lat, samples=3, samples_per_caption=2,
                                 sampler=SamplerSettings(steps=2), clip=str(tiny_clip_model(tmp_path / "clip")),
                                 judge=str(tmp_path / "judge")))
    n = report["samples"]
    assert 2 <= n <= 3  # the held-out rows (by content hash) among the pipeline's, at most --samples
    assert report["images"] == 2 * n and report["samples_per_caption"] == 2
    assert report["guidance"] == 5.0  # no --guidance: the model's own (the tiny preset's), recorded
    assert report["judge"]["content_id"] == judge_id and report["judge"]["uri"] == str(tmp_path / "judge")
    assert report["heldout_loss"] > 0
    # a 4-step model draws no copy of a training image; the share and the median are of each caption's first sample
    assert report["near_copy_share"] == 0.0 and report["nearest_mse_median"] > report["near_copy_threshold"]
    assert tiny.card["image"] == {"dataset_mode": "RGBA", "vae_channels": 4, "alpha": "vae", "key_colour": None}
    assert set(report["alpha"]) == {"real", "samples"} and report["alpha"]["real"]["opaque"] < 1.0
    recon = report["vae_reconstruction"]
    assert recon["channels"] == 4 and recon["rgb_mse"] > 0 and recon["alpha_mse"] is not None
    assert 0 < recon["visible_mse"] <= 4  # as seen on mid-grey
    assert report["clip_score"] is not None and report["inception_fid"] is None
    assert report["emoji_fid"] >= 0 and report["emoji_kid_std"] >= 0
    # shares: of n first samples (precision) and n held-out images (recall); prompt accuracy of 2 samples per
    # labelled caption, the baselines of one image per caption
    labelled = report["labelled_samples"]
    assert 1 <= labelled <= n
    assert _is_share(report["precision"], n) and _is_share(report["recall"], n)
    assert _is_share(report["prompt_accuracy"], 2 * labelled) and _is_share(report["real_accuracy"], labelled)
    figures = report["protocol"]["figures"]["all"]
    assert figures["captions"] == labelled and set(figures) >= {"model", "real", "retrieval", "empty"}
    for system in ("model", "real", "retrieval", "empty"):
        low, high = figures[system]["interval"]
        assert low <= figures[system]["mean"] <= high, system
    assert _is_share(figures["retrieval"]["mean"], labelled)
    assert report["summary"].startswith("prompt accuracy (no flags)")
    assert "Jaccard" in report["protocol"]["retrieval"]
    chat = report["legibility"]  # the samples (2 per caption) and the real images on each chat theme
    assert chat["samples"]["labelled"] == 2 * labelled and chat["real"]["labelled"] == labelled
    for who in ("samples", "real"):
        assert chat[who]["px"] == 22 and chat[who]["min"] == min(chat[who]["themes"].values())
        assert set(chat[who]["themes"]) == {"slack-light", "slack-dark", "discord-light", "discord-dark"}


def test_known_inputs_give_known_values(tiny):
    """An image set against itself is all inside the other's manifold (precision = recall = 1) and all copies of
    the dataset (nearest MSE 0); moved far away from itself, none is inside."""
    from emoji_ldm.eval.frozen_judge import frozen_judge
    from emoji_ldm.eval.reference import dataset_rows, nearest_training_mse
    from emoji_ldm.eval.scores import precision_recall
    from emoji_ldm.imaging import composite
    from emoji_ldm.store.latents import open_latent_table

    judge = frozen_judge()
    meta = open_latent_table(tiny.lat)[2]
    real = dataset_rows(meta, "train", 4)["image"]
    features = judge.features(judge.pixels(real))
    assert precision_recall(features, features) == (1.0, 1.0)
    assert precision_recall(features, features + 1e3 * (1 + np.abs(features).max())) == (0.0, 0.0)
    pixels = np.stack([np.asarray(composite(im), dtype=np.float32).ravel() / 255.0 for im in real])
    assert nearest_training_mse(meta, pixels, real[0].size[0]).max() < 1e-6


def test_eval_command_with_the_frozen_judge(tiny, tmp_path, cli_in_process, capsys):
    """`eval` as a process measures with the frozen judge unless told otherwise, and says so; `--real` (in this
    process) judges the held-out images twice; judges that do not load are one line each, before sampling."""
    from emoji_ldm.cli.main import main
    from emoji_ldm.eval.frozen_judge import frozen_judge
    from emoji_ldm.eval.judge_net import short_id

    r = run_cli("eval", "--model", str(tiny.run), "--data", tiny.lat, "--samples", "2", "--samples-per-caption",
                "2", "--steps", "2", "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    frozen = frozen_judge().meta["content_id"]
    assert json.loads((tmp_path / "eval.json").read_text())["judge"]["content_id"] == frozen
    assert f"judge frozen:twemoji-subgroup-v1, content id {short_id(frozen)}" in r.stdout
    for text in ("prompt accuracy (no flags)", "prompt accuracy (all rows)", "bootstrap over captions",
                 "held-out denoising loss", "CLIP score: not computed", "transparency (samples | real)",
                 "VAE reconstruction MSE", "emoji-FID", "not the Inception FID", "legibility at 22 px (samples | real"):
        assert text in r.stdout, text
    assert main(["eval", "--real", "--data", tiny.lat, "--samples", "2", "--out", str(tmp_path / "real.json")]) == 0
    assert "real training images (--real)" in capsys.readouterr().out
    real = json.loads((tmp_path / "real.json").read_text())
    assert real["prompt_accuracy"] == real["real_accuracy"]  # --real: the same images, judged twice
    assert real["legibility"]["samples"] == real["legibility"]["real"] and real["samples_per_caption"] == 1
    assert "empty" not in real["protocol"]["figures"]["all"]  # no model to prompt with ""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "judge.json").write_text('{"classes": ["a", "b"], "width": 8, "image_size": 32}')
    (tmp_path / "broken" / "judge.pt").write_bytes(b"not a state dict")
    for flags, message in [(["--judge", str(tmp_path / "nope")], "no judge.json there; train one with"),
                           (["--judge", str(tmp_path / "broken")], "the judge does not load"),
                           (["--inception", str(tmp_path / "pt_inception.pth")], "no such file"),
                           (["--samples-per-caption", "0"], "--samples-per-caption must be 1..64, got 0")]:
        code, err = cli_in_process("eval", "--model", str(tiny.run), "--data", tiny.lat, "--samples", "2", *flags)
        assert code == 2 and message in err and "Traceback" not in err, err


def test_judge_learns_twemoji_groups(ray_local, tmp_path):
    """A judge trained on a dataset (a Twemoji slice: every 8th PNG): held-out accuracy above the majority class,
    and a content id that loading checks."""
    import shutil

    from emoji_ldm.eval.judge import JudgeConfig, load_judge, train_judge
    from emoji_ldm.sources.twemoji import twemoji_dir

    folder = tmp_path / "slice"
    folder.mkdir()
    for png in sorted(twemoji_dir().glob("*.png"))[::8]:
        shutil.copy(png, folder / png.name)
    build_dataset(BuildConfig(source=f"dir:{folder}", out=str(tmp_path / "ds")))
    meta = train_judge(JudgeConfig(data=str(tmp_path / "ds"), out=str(tmp_path / "judge"), label="group",
                                   epochs=8, width=16))
    assert len(meta["classes"]) >= 8 and meta["val_rows"] > 20
    assert meta["val_accuracy"] > meta["majority_baseline"], meta
    judge = load_judge(str(tmp_path / "judge"))
    assert judge.classes == meta["classes"] and judge.meta["dataset"].endswith("ds@0")
    assert judge.meta["content_id"] == meta["content_id"].strip() and meta["content_id"].startswith("sha256:")
