"""Evaluate a trained model: prompt accuracy with error bars beside its baselines, sample quality, held-out loss
and memorisation.

    emoji-ldm eval --model URI --data LATENT_URI[@v] [--samples 256] [--samples-per-caption 4] [--judge URI]
    emoji-ldm eval --real --data LATENT_URI[@v]      # the floor a perfect model would reach

Everything the judge measures is measured by the frozen judge shipped with the package (`frozen_judge.py`)
unless `--judge` names another; the report carries the judge's content id, and figures from two judges are
never compared (`compare.py`). From `--samples` held-out rows (the `val` split by content hash) of the dataset
version the latent table was encoded from, each caption drawn `--samples-per-caption` times on fixed seeds:
- prompt accuracy: the share of a caption's samples the judge puts in the caption's class (Unicode
  subgroup), with its 95% interval (a bootstrap over captions: one caption's samples are not independent),
  over all captions, without flag emoji, and per Unicode group; beside three baselines on the same captions:
  the real held-out images, the model prompted with "" (the empty prompt), and caption retrieval (the real
  image of the most similar training caption, `retrieval.py`). `protocol.py` has the statistics; the report's
  `summary` is its one line, e.g. "prompt accuracy (no flags) 31.2% [27.9, 34.6] = 0.82x real images (38.0%),
  empty prompt 3.1%, caption retrieval 22.4%";
- emoji-FID, KID and precision/recall (k = 3 nearest neighbours) of one sample per caption against the
  held-out images, in the judge's feature space: "emoji-FID", not the Inception FID papers report;
- Inception FID when a local Inception-v3 weights file is given (`--inception FILE`: torchmetrics' FID with
  `feature_extractor_weights_path`, which needs the `torch-fidelity` package), and the CLIP score when a local
  CLIP folder is (`--clip DIR`);
- legibility at chat size (`legibility.py`), samples beside the real images;
- held-out denoising loss: noise-prediction MSE on the latent table's `val` split at fixed noise and fixed
  timesteps (50, 250, 500, 750, 950);
- memorisation: the share of samples (each caption's first) whose nearest image in the dataset version is a
  near-copy (pixel MSE below `--near-copy`);
- transparency (`emoji_ldm.imaging.alpha_figures`), for the samples beside the held-out real images, and the
  VAE's reconstruction error of the held-out images, colour and alpha apart (the autoencoder is the ceiling of
  everything after it).

The judge, emoji-FID and the pixel distances see every image composited on mid-grey (`alpha.composite`), so
RGBA and RGB models compare. `--real` puts real training-split images where the samples would be (one per
caption): the metrics a model that reproduces its training data would reach.

Bounded at any table size: the work is `--samples` x (`--samples-per-caption` + 1) images and passes over the
dataset version that keep only per-sample results. The held-out loss reads at most `--val-rows` rows of the
`val` split's files (from the Delta log, never the whole table); the real images are the first `--samples`
rows of the split that a streaming Ray Data filter yields (the read stops there); the nearest-image search and
caption retrieval stream the dataset version's images through Ray Data tasks, each returning only its batch's
best match per sample, folded on the driver.

The measures are in `scores.py`, the real rows and images they compare with in `reference.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.eval.reference import dataset_rows, nearest_training_mse, val_rows
from emoji_ldm.eval.scores import (
    TIMESTEPS,
    clip_score,
    heldout_loss,
    inception_metric,
    uint8_on_grey,
    vae_reconstruction,
)
from emoji_ldm.inference.settings import SamplerSettings


@dataclass(frozen=True)
class EvalConfig:
    data: str = opt(help="the latent table URI[@VERSION] it was trained on")
    model: str | None = opt(None, help="a model folder/URI (or a training --out); not with --real")
    judge: str | None = opt(None, help="the emoji judge for emoji-FID/KID, precision/recall and prompt accuracy; "
                                       "by default the frozen judge shipped with emoji-ldm (its content id is in "
                                       "the report), else a judge from `emoji-ldm train-judge --out URI`")
    real: bool = opt(False, help="measure real training images instead of samples: the floor of every metric")
    samples: int = opt(256, help="held-out captions (and their real images) to measure on, 2-10000")
    samples_per_caption: int = opt(4, help="images drawn per held-out caption (seeds in a row), 1-64: a caption's "
                                           "samples share its prompt, so intervals resample captions")
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
        if not 1 <= self.samples_per_caption <= 64:
            raise UserError(f"--samples-per-caption must be 1..64, got {self.samples_per_caption}")


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
    """A model's samples for the held-out prompts (`samples_per_caption` each, caption-major), and what needs the
    model: its images for the empty prompt, the held-out denoising loss, the near-copy share and the VAE's
    reconstruction error."""
    import torch

    from emoji_ldm.imaging import composite
    from emoji_ldm.inference.sampler import ImageAlpha, model_card
    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.models.presets import preset_from_dict
    from emoji_ldm.store.latents import decode_latents, own_caption

    card = model_card(config.model)
    s = config.sampler.with_model_guidance(card)  # as `generate` and the service draw it
    preset = preset_from_dict(meta["preset"])
    val = val_rows(table, config.val_rows)
    decoded = decode_latents({k: val.column(k).to_pylist() for k in ("latent", "latent_shape", "text_emb",
                                                                      "text_shape")})
    loss = heldout_loss(pipe.unet, noise_scheduler(preset), torch.from_numpy(decoded["latent"]).float(),
                        torch.from_numpy(own_caption(decoded["text_emb"])).float(), seed=s.seed)
    measures = {"guidance": s.guidance, "val_rows": val.num_rows, "timesteps": list(TIMESTEPS), "heldout_loss": loss}
    image_alpha = ImageAlpha.of(card)
    k = config.samples_per_caption
    images = generate_samples(pipe, [c for c in heldout["caption"] for _ in range(k)], s, alpha=image_alpha)
    # the empty prompt, one image per caption, on seeds after the captions' own
    measures["empty_prompt_images"] = generate_samples(pipe, [""] * len(heldout["caption"]),
                                                       replace(s, seed=s.seed + len(images)), alpha=image_alpha)
    size = images[0].size[0]
    # memorisation over each caption's first sample: the cost of the dataset pass stays that of one per caption
    sample_px = np.stack([np.asarray(composite(im), dtype=np.float32).ravel() / 255.0 for im in images[::k]])
    nearest = nearest_training_mse(meta, sample_px, size)
    measures.update(near_copy_share=float((nearest < config.near_copy).mean()), near_copy_threshold=config.near_copy,
                    nearest_mse_median=float(np.median(nearest)))
    measures["vae_reconstruction"] = vae_reconstruction(pipe.vae, heldout["image"], size, preset.vae.key_colour,
                                                        alpha=image_alpha)
    return images, measures


def evaluate(config: EvalConfig) -> dict:
    """The report of one model (or of real training images, `--real`) against the held-out rows."""
    from emoji_ldm.eval.frozen_judge import judge_for
    from emoji_ldm.eval.judged import judge_report
    from emoji_ldm.eval.retrieval import retrieve
    from emoji_ldm.imaging import alpha_figures
    from emoji_ldm.store.latents import open_latent_table

    # everything that can be wrong with the inputs fails here, before sampling
    ref, table, meta = open_latent_table(config.data)
    judge = judge_for(config.judge)
    inception = inception_metric(config.inception) if config.inception else None
    pipe = model_pipeline(config) if config.model else None

    heldout = dataset_rows(meta, "val", config.samples)
    prompts = heldout["caption"]
    report = {"model": config.model or "real training images (--real)", "latent_table": f"{ref.uri}@{table.version()}",
              "dataset": f"{meta['dataset']}@{meta['dataset_version']}", "samples": len(prompts),
              "real": config.real, "judge": None, "inception_fid": None, "clip_score": None,
              "heldout_loss": None, "near_copy_share": None}
    k, empty = 1, None
    if config.real:
        images = dataset_rows(meta, "train", len(prompts))["image"]
    else:
        k = config.samples_per_caption
        images, measures = _model_measures(config, pipe, table, meta, heldout)
        empty = measures.pop("empty_prompt_images")
        report.update(measures)
    report.update(images=len(images), samples_per_caption=k)
    report["alpha"] = {"real": alpha_figures(heldout["image"]), "samples": alpha_figures(images)}
    report.update(judge_report(judge, heldout, images, k, empty, retrieve(meta, prompts), config.real,
                               seed=config.sampler.seed))
    if inception is not None:
        inception.update(uint8_on_grey(heldout["image"]), real=True)
        inception.update(uint8_on_grey(images[::k]), real=False)
        report["inception_fid"] = float(inception.compute())
    if config.clip:
        report["clip_score"] = clip_score(config.clip, images[::k], prompts)
    if config.out:
        with open(config.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def format_report(r: dict) -> str:
    def num(v, fmt=".2f", none="not computed"):
        return none if v is None else format(v, fmt)

    from emoji_ldm.eval.judge_net import short_id
    from emoji_ldm.eval.protocol import group_lines, summary_line

    j, figures = r["judge"], r["protocol"]["figures"]
    drawn = f", guidance {r['guidance']:g}" if r.get("guidance") is not None else ""
    lines = [f"eval {r['model']} on {r['dataset']} ({r['samples']} held-out captions x {r['samples_per_caption']} "
             f"samples{drawn}; latents {r['latent_table']})",
             f"  {r['summary']}",
             f"  {summary_line(figures, 'all')}",
             f"  ({r['protocol']['interval']}; judge {j['uri']}, content id {short_id(j['content_id'])}, "
             f"{j['classes']} {j['label']} classes)",
             "  per Unicode group, samples | real images:", *group_lines(figures),
             f"  emoji-FID {r['emoji_fid']:.2f}  KID {r['emoji_kid']:.4f} +- {r['emoji_kid_std']:.4f}  precision "
             f"{r['precision']:.2f}  recall {r['recall']:.2f}  (in the judge's features, one sample per caption; "
             "not the Inception FID of papers)"]
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
