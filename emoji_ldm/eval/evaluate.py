"""Evaluate a trained model: sample quality, prompt accuracy, held-out loss and memorisation.

    emoji-ldm eval --model URI --data LATENT_URI[@v] --judge JUDGE_URI [--samples 256] [--inception FILE]
    emoji-ldm eval --real --data LATENT_URI[@v] --judge JUDGE_URI      # the floor a perfect model would reach

Reports, from `--samples` images generated with fixed seeds from the captions
of held-out rows (the `val` split by content hash) of the dataset version the
latent table was encoded from:
- emoji-FID, KID and precision/recall (k = 3 nearest neighbours) against those
  held-out rows' real images, in the feature space of the emoji judge
  (`emoji-ldm train-judge`, `emoji_ldm.eval.judge`). These are "emoji-FID": only
  comparable between models measured with the same judge, and not the
  Inception FID papers report;
- Inception FID when a local Inception-v3 weights file is given
  (`--inception FILE`: torchmetrics' FID with `feature_extractor_weights_path`,
  which needs the `torch-fidelity` package), and the CLIP score when a local
  CLIP folder is (`--clip DIR`);
- prompt accuracy: the share of samples the judge puts in the class (Unicode
  subgroup) of the row whose caption prompted them, beside the judge's
  accuracy on those rows' real images: the ceiling;
- held-out denoising loss: noise-prediction MSE on the latent table's `val`
  split at fixed noise and fixed timesteps (50, 250, 500, 750, 950);
- memorisation: the share of samples whose nearest image in the dataset
  version is a near-copy (pixel MSE below `--near-copy`);
- transparency (`emoji_ldm.imaging.alpha_figures`), for the samples beside the
  held-out real images: the share with a transparent border, the share of
  stray semi-transparent pixels, the share fully opaque; and the VAE's
  reconstruction error of the held-out images, colour and alpha apart (the
  autoencoder is the ceiling of everything after it).

The judge, emoji-FID and the pixel distances see every image composited on
mid-grey (`alpha.composite`), so RGBA and RGB models compare.

`--real` puts real training-split images where the samples would be: the
metrics a model that reproduces its training data would reach.

Bounded at any table size: the held-out loss reads at most `--val-rows` rows
of the `val` split's files (from the Delta log, never the whole table); the
real images are the first `--samples` rows of the split that a streaming Ray
Data filter yields (the read stops there); the nearest-image search streams
the dataset version's images through Ray Data tasks (held-out images included,
so the near-copy share is an upper bound), each task returning only its
batch's nearest distances, folded on the driver into one value per sample.

The measures are in `scores.py`, the real rows and images they compare with in
`reference.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.eval.reference import dataset_rows, nearest_training_mse, val_rows
from emoji_ldm.eval.scores import (
    TIMESTEPS,
    clip_score,
    heldout_loss,
    inception_metric,
    judge_metrics,
    uint8_on_grey,
    vae_reconstruction,
)
from emoji_ldm.inference.settings import SamplerSettings


@dataclass(frozen=True)
class EvalConfig:
    data: str = opt(help="the latent table URI[@VERSION] it was trained on")
    model: str | None = opt(None, help="a model folder/URI (or a training --out); not with --real")
    judge: str | None = opt(None, help="the emoji judge (emoji-ldm train-judge --out) for emoji-FID/KID, "
                                       "precision/recall and prompt accuracy")
    real: bool = opt(False, help="measure real training images instead of samples: the floor of every metric")
    samples: int = opt(256, help="images generated (and held-out images compared), 2-10000")
    sampler: SamplerSettings = opt(default_factory=SamplerSettings, skip=("count", "size", "negative_prompt"),
                                   help="sampler settings")
    near_copy: float = opt(0.005, help="pixel MSE (images in [0, 1]) below which a sample counts as a copy")
    val_rows: int = opt(2048, help="held-out rows for the denoising loss (read from the val split only)")
    clip: str | None = opt(None, help="a local CLIP model folder for the CLIP score")
    inception: str | None = opt(None, help="a local Inception-v3 weights file (torch-fidelity's FID weights, "
                                           "pt_inception-2015-12-05) for the standard FID")
    out: str | None = opt(None, help="also write the report as JSON here")
    use_gpu: bool = opt(False, flag="gpu", help="sample and measure on a GPU (cuda, fp32 as on CPU); default CPU")

    def __post_init__(self):
        if not 2 <= self.samples <= 10_000:
            raise UserError(f"--samples must be 2..10000, got {self.samples}")
        if self.real == bool(self.model):
            raise UserError("give --model URI to evaluate a model, or --real (without --model) for the real-data floor")
        if self.val_rows < 1:
            raise UserError(f"--val-rows must be 1 or more, got {self.val_rows}")


def model_pipeline(config: EvalConfig):
    """The model's pipeline on the eval device, in fp32 there too: a GPU's default bf16 (`--dtype auto`) would
    move the held-out loss and the sample metrics, and eval reports must compare across devices and runs."""
    from emoji_ldm.inference.sampler import InferenceOptions, inference_device, load_pipeline

    return load_pipeline(config.model, device=inference_device(config.use_gpu),
                         options=InferenceOptions(dtype="fp32"))


def generate_samples(pipe, prompts: list[str], s, batch: int = 64, alpha=None) -> list:
    from emoji_ldm.inference.sampler import run_pipeline

    images = []
    for i in range(0, len(prompts), batch):  # image k from seed + k, whatever the batching
        images += run_pipeline(pipe, prompts[i:i + batch], steps=s.steps, guidance=s.guidance, seed=s.seed + i,
                               alpha=alpha)
    return images


def _model_measures(config: EvalConfig, pipe, table, meta: dict, heldout: dict) -> tuple[list, dict]:
    """A model's samples for the held-out prompts, and what needs the model: the held-out denoising loss, the
    near-copy share and the VAE's reconstruction error."""
    import torch

    from emoji_ldm.imaging import composite
    from emoji_ldm.inference.sampler import ImageAlpha, model_card
    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.models.presets import preset_from_dict
    from emoji_ldm.store.latents import decode_latents

    s = config.sampler
    preset = preset_from_dict(meta["preset"])
    val = val_rows(table, config.val_rows)
    decoded = decode_latents({k: val.column(k).to_pylist() for k in ("latent", "latent_shape", "text_emb",
                                                                      "text_shape")})
    measures = {"val_rows": val.num_rows, "timesteps": list(TIMESTEPS), "heldout_loss": heldout_loss(
        pipe.unet, noise_scheduler(preset), torch.from_numpy(decoded["latent"]).float(),
        torch.from_numpy(decoded["text_emb"]).float(), seed=s.seed)}
    image_alpha = ImageAlpha.of(model_card(config.model))
    images = generate_samples(pipe, heldout["caption"], s, alpha=image_alpha)
    size = images[0].size[0]
    sample_px = np.stack([np.asarray(composite(im), dtype=np.float32).ravel() / 255.0 for im in images])
    nearest = nearest_training_mse(meta, sample_px, size)
    measures.update(near_copy_share=float((nearest < config.near_copy).mean()), near_copy_threshold=config.near_copy,
                    nearest_mse_median=float(np.median(nearest)))
    measures["vae_reconstruction"] = vae_reconstruction(pipe.vae, heldout["image"], size, preset.vae.key_colour,
                                                        alpha=image_alpha)
    return images, measures


def _judged(judge, config: EvalConfig, heldout: dict, images: list) -> dict:
    """emoji-FID/KID and precision/recall in the judge's features, and the prompt accuracy: the share of images
    the judge puts in the class of the row whose caption prompted them (beside the real images': the ceiling)."""
    from emoji_ldm.eval.judge import row_label
    from emoji_ldm.eval.legibility import legibility

    labels = [row_label(judge.meta["label"], u, t, g)
              for u, t, g in zip(heldout["source_url"], heldout["title"], heldout["tag"])]
    classes = set(judge.classes)
    known = [i for i, y in enumerate(labels) if y in classes]
    real_px, fake_px = judge.pixels(heldout["image"]), judge.pixels(images)  # (N, S, S, 3) uint8, once each
    real_pred = judge.predict(real_px[known]) if known else []
    # --real, the floor: real images in the samples' place, measured against their own classes
    fake_pred = real_pred if config.real or not known else judge.predict(fake_px[known])
    truth = [labels[i] for i in known]
    # at chat size (22 px on Slack's and Discord's light and dark backgrounds): the samples, and the real images
    # as the ceiling; --real measures real images in the samples' place
    chat = {"samples": legibility(judge, heldout["image"] if config.real else images, labels),
            "real": legibility(judge, heldout["image"], labels)}
    return {**judge_metrics(judge, real_px, fake_px), "legibility": chat,
            "judge": {"uri": config.judge, "label": judge.meta["label"], "classes": len(judge.classes),
                      "val_accuracy": judge.meta.get("val_accuracy"), "dataset": judge.meta.get("dataset")},
            "prompt_accuracy": float(np.mean([p == y for p, y in zip(fake_pred, truth)])) if known else None,
            "real_accuracy": float(np.mean([p == y for p, y in zip(real_pred, truth)])) if known else None,
            "labelled_samples": len(known)}


def evaluate(config: EvalConfig) -> dict:
    """The report of one model (or of real training images, `--real`) against the held-out rows."""
    from emoji_ldm.eval.judge import load_judge
    from emoji_ldm.imaging import alpha_figures
    from emoji_ldm.store.latents import open_latent_table

    # everything that can be wrong with the inputs fails here, before sampling
    ref, table, meta = open_latent_table(config.data)
    judge = load_judge(config.judge) if config.judge else None
    inception = inception_metric(config.inception) if config.inception else None
    pipe = model_pipeline(config) if config.model else None

    heldout = dataset_rows(meta, "val", config.samples)
    prompts = heldout["caption"]
    report = {"model": config.model or "real training images (--real)", "latent_table": f"{ref.uri}@{table.version()}",
              "dataset": f"{meta['dataset']}@{meta['dataset_version']}", "samples": len(prompts),
              "real": config.real, "judge": None, "inception_fid": None, "clip_score": None,
              "heldout_loss": None, "near_copy_share": None}
    if config.real:
        images = dataset_rows(meta, "train", len(prompts))["image"]
    else:
        images, measures = _model_measures(config, pipe, table, meta, heldout)
        report.update(measures)
    report["alpha"] = {"real": alpha_figures(heldout["image"]), "samples": alpha_figures(images)}
    if judge is not None:
        report.update(_judged(judge, config, heldout, images))
    if inception is not None:
        inception.update(uint8_on_grey(heldout["image"]), real=True)
        inception.update(uint8_on_grey(images), real=False)
        report["inception_fid"] = float(inception.compute())
    if config.clip:
        report["clip_score"] = clip_score(config.clip, images, prompts)
    if config.out:
        with open(config.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def format_report(r: dict) -> str:
    def num(v, fmt=".2f", none="not computed"):
        return none if v is None else format(v, fmt)

    lines = [f"eval {r['model']} on {r['dataset']} ({r['samples']} held-out prompts; latents {r['latent_table']})"]
    if r["judge"]:
        j = r["judge"]
        lines += [
            f"  emoji-FID {r['emoji_fid']:.2f}  KID {r['emoji_kid']:.4f} +- {r['emoji_kid_std']:.4f}  precision "
            f"{r['precision']:.2f}  recall {r['recall']:.2f}  (features: emoji judge {j['uri']}, {j['classes']} "
            f"{j['label']} classes; not the Inception FID of papers)",
            f"  prompt accuracy {num(r['prompt_accuracy'], '.1%')} (ceiling: real held-out images "
            f"{num(r['real_accuracy'], '.1%')}) over {r['labelled_samples']} labelled prompts",
        ]
    else:
        lines.append("  emoji-FID/KID, precision/recall, prompt accuracy, legibility: not computed "
                     "(pass --judge URI from `emoji-ldm train-judge`)")
    if r.get("legibility"):
        lines.append(legibility_line(r["legibility"]))
    lines.append(f"  Inception FID: {num(r['inception_fid'], '.2f', 'not computed (pass --inception FILE)')}")
    lines.append(f"  CLIP score: {num(r['clip_score'], '.2f', 'not computed (pass --clip DIR, a local CLIP)')}")
    if r["heldout_loss"] is not None:
        lines.append(f"  held-out denoising loss: {r['heldout_loss']:.4f} ({r['val_rows']} rows, fixed noise, "
                     f"t = {r['timesteps']})")
    if r.get("vae_reconstruction"):
        v = r["vae_reconstruction"]
        lines.append(f"  VAE reconstruction MSE of the held-out images ({v['channels']} channels): colour "
                     f"{v['rgb_mse']:.4f}, alpha {num(v['alpha_mse'], '.4f', 'n/a (opaque images)')}"
                     f"{' (keyed from the key colour)' if v.get('alpha_keyed') else ''}"
                     + (f", as seen on mid-grey {v['visible_mse']:.4f}" if v.get("visible_mse") is not None else ""))
    if r.get("alpha"):
        a = r["alpha"]
        lines.append("  transparency (samples | real): transparent border "
                     f"{a['samples']['transparent_border']:.1%} | {a['real']['transparent_border']:.1%}, stray "
                     f"semi-transparent pixels {a['samples']['stray_semi']:.2%} | {a['real']['stray_semi']:.2%}, "
                     f"opaque {a['samples']['opaque']:.1%} | {a['real']['opaque']:.1%}")
    if r["near_copy_share"] is not None:
        lines.append(f"  memorisation: {100 * r['near_copy_share']:.1f}% of {r['samples']} samples are near-copies "
                     f"of a dataset image (MSE < {r['near_copy_threshold']}; median nearest MSE "
                     f"{r['nearest_mse_median']:.4f})")
    return "\n".join(lines)


def legibility_line(chat: dict) -> str:
    """The report's line for legibility at chat size: prompt accuracy per theme and the worst, samples | real."""
    samples, real = chat["samples"], chat["real"]
    if not samples["labelled"]:
        return f"  legibility at {samples['px']} px: not computed (no sample's prompt names a class the judge knows)"
    themes = ", ".join(f"{t} {v:.1%} | {real['themes'][t]:.1%}" for t, v in samples["themes"].items())
    return (f"  legibility at {samples['px']} px (samples | real, judge's prompt accuracy on each chat theme): "
            f"{themes}; min {samples['min']:.1%} | {real['min']:.1%}")
