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
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.inference.settings import SamplerSettings

TIMESTEPS = (50, 250, 500, 750, 950)
PR_K = 3  # neighbours for precision/recall (Kynkaanniemi et al. 2019)


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
    use_gpu: bool = opt(False, flag="gpu", help="sample and measure on a GPU (cuda); default CPU")

    def __post_init__(self):
        if not 2 <= self.samples <= 10_000:
            raise UserError(f"--samples must be 2..10000, got {self.samples}")
        if self.real == bool(self.model):
            raise UserError("give --model URI to evaluate a model, or --real (without --model) for the real-data floor")
        if self.val_rows < 1:
            raise UserError(f"--val-rows must be 1 or more, got {self.val_rows}")


def heldout_loss(unet, noise_sched, latents, text, seed: int = 0, batch: int = 64) -> float:
    """The training objective's MSE at fixed noise and timesteps over the given rows: against the noise, or the
    velocity for a v-prediction model (`noise_sched.config.prediction_type`)."""
    import torch

    from emoji_ldm.models.objective import diffusion_target

    device = getattr(unet, "device", torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    eps_all = torch.randn(latents.shape, generator=gen)  # fixed noise per row, the same on any device
    total, count = 0.0, 0
    with torch.no_grad():
        for t_value in TIMESTEPS:
            for i in range(0, len(latents), batch):
                x0, cond, eps = (v[i:i + batch].to(device) for v in (latents, text, eps_all))
                t = torch.full((len(x0),), t_value, dtype=torch.long, device=device)
                dtype = getattr(unet, "dtype", torch.float32)
                pred = unet(noise_sched.add_noise(x0, eps, t).to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
                pred = pred.float()
                target = diffusion_target(noise_sched, x0, eps, t, noise_sched.config.prediction_type)
                total += float(torch.nn.functional.mse_loss(pred, target, reduction="sum"))
                count += eps.numel()
    return total / count


def nearest_mse(samples: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(S, D) and (N, D) in [0, 1] -> MSE to the nearest training image, (S,)."""
    s2 = (samples**2).sum(1)[:, None]
    t2 = (train**2).sum(1)[None, :]
    d = (s2 + t2 - 2 * samples @ train.T) / samples.shape[1]
    return np.maximum(d.min(1), 0.0)


def clip_score(folder: str, images, prompts: list[str]) -> float:
    """CLIP's image-text similarity x 100, every image on mid-grey as the judge and emoji-FID see it (CLIP's
    processor alone composites RGBA onto white)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from emoji_ldm.imaging import composite

    model = CLIPModel.from_pretrained(folder).eval()
    tok, proc = CLIPTokenizer.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=[composite(im) for im in images], return_tensors="pt"))
        txt = model.get_text_features(**tok(prompts, padding=True, truncation=True, return_tensors="pt"))
    # transformers 5 returns model outputs whose pooler_output holds the projected features
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return float(100 * (img * txt).sum(-1).clamp(min=0).mean())


def _val_rows(table, n: int):
    """At most `n` rows of the held-out split (the train split when there is no val split): only its files."""
    import pyarrow.dataset as pds

    from emoji_ldm.store.latents import split_files
    from emoji_ldm.store.uri import filesystem

    files = split_files(table, "val") or split_files(table, "train")
    if not files:
        raise UserError(f"the latent table {table.table_uri!r} has no rows to evaluate on")
    fs, _ = filesystem(files[0].uri)
    paths = [filesystem(f.uri)[1] for f in files]
    return pds.dataset(paths, filesystem=fs, format="parquet").head(
        n, columns=["id", "caption", "latent", "latent_shape", "text_emb", "text_shape"])


def _nearest_batch(batch: dict, samples: np.ndarray, size: int) -> dict:
    """Ray Data task: a batch of training PNGs -> its smallest MSE to each sample, (1, S)."""
    from PIL import Image

    from emoji_ldm.imaging import composite

    train = np.stack([np.asarray(composite(Image.open(io.BytesIO(png))).resize(
        (size, size), Image.Resampling.LANCZOS), dtype=np.float32).ravel() / 255.0 for png in batch["image"]])
    return {"nearest": nearest_mse(samples, train)[None, :]}


def nearest_training_mse(meta: dict, samples: np.ndarray, size: int) -> np.ndarray:
    """(S, D) samples -> MSE to the nearest image of the dataset version the model was trained from, (S,).

    Every image of that version is compared (train and held-out alike, so the near-copy share is an upper
    bound), streamed through Ray tasks that return only their batch's minima: no join, no id set.
    """
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.store.delta import read_dataset
    from emoji_ldm.store.uri import DatasetRef

    ensure_ray()
    images, _ = read_dataset(DatasetRef(DatasetRef.parse(meta["dataset"]).uri, version=meta["dataset_version"]),
                             columns=["image"])
    nearest = images.map_batches(_nearest_batch, fn_kwargs={"samples": samples, "size": size}, batch_size=256,
                                 batch_format="numpy")
    best = np.full(len(samples), np.inf)
    for batch in nearest.iter_batches(batch_format="numpy"):
        best = np.minimum(best, batch["nearest"].min(axis=0))
    return best


def _split_rows(batch: dict, split: str) -> dict:
    """Ray Data task: keep the rows of one split (by content hash, as the latent tables split)."""
    from emoji_ldm.store.splits import split_of

    keep = np.array([split_of(i) == split for i in batch["id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def dataset_rows(meta: dict, split: str, n: int) -> dict[str, list]:
    """The first `n` rows of one split of the dataset version a latent table was encoded from.

    A streaming filter that stops once `n` rows came through: the cost is n / (the split's share) rows, not
    the table. Columns: image (PIL), caption (or the title when uncaptioned), source_url, title, tag.
    """
    from PIL import Image

    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.store.delta import read_dataset
    from emoji_ldm.store.uri import DatasetRef

    ensure_ray()
    ds, _ = read_dataset(DatasetRef(DatasetRef.parse(meta["dataset"]).uri, version=meta["dataset_version"]),
                         columns=["id", "image", "caption", "source_url", "title", "tag"])
    rows: dict[str, list] = {k: [] for k in ("image", "caption", "source_url", "title", "tag")}
    kept = ds.map_batches(_split_rows, fn_kwargs={"split": split}, batch_format="numpy", batch_size=512)
    for batch in kept.limit(n).iter_batches(batch_format="numpy", batch_size=256):
        for i, png in enumerate(batch["image"]):
            rows["image"].append(Image.open(io.BytesIO(png)).convert("RGBA"))
            rows["caption"].append(str(batch["caption"][i] or batch["title"][i] or ""))
            for k in ("source_url", "title", "tag"):
                rows[k].append(batch[k][i])
    if len(rows["image"]) < 2:
        raise UserError(f"the dataset {meta['dataset']}@{meta['dataset_version']} has {len(rows['image'])} "
                        f"{split} row(s); eval needs 2 or more")
    return rows


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of (N, F) and (M, F) features.

    Precision: the share of fakes inside the real manifold (some real point's k-NN ball holds it); recall:
    the share of reals inside the fake manifold.
    """
    import torch

    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()

    def radii(x):
        k_ = min(k, len(x) - 1)
        return torch.cdist(x, x).kthvalue(k_ + 1, dim=1).values  # +1: the point itself is at distance 0

    d = torch.cdist(f, r)  # (M, N)
    precision = (d <= radii(r)[None, :]).any(1).double().mean()
    recall = (d.T <= radii(f)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def _uint8(images):
    """PIL images -> (N, 3, H, W) uint8 on mid-grey, as torchmetrics takes them."""
    import torch

    from emoji_ldm.imaging import composite

    return torch.from_numpy(np.stack([np.asarray(composite(im), dtype=np.uint8) for im in images])
                            ).permute(0, 3, 1, 2)  # (N, 3, H, W)


def judge_metrics(judge, real: np.ndarray, fake: np.ndarray) -> dict:
    """emoji-FID, KID and precision/recall of two image sets ((N, S, S, 3) uint8 at the judge's size) in the
    judge's feature space."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    fid = FrechetInceptionDistance(feature=judge.feature_module(), reset_real_features=False)
    kid = KernelInceptionDistance(feature=judge.feature_module(), subset_size=min(100, n), subsets=50)
    for metric in (fid, kid):
        metric.update(_uint8_from(real), real=True)
        metric.update(_uint8_from(fake), real=False)
    kid_mean, kid_std = kid.compute()
    precision, recall = precision_recall(judge.features(real), judge.features(fake))
    return {"emoji_fid": float(fid.compute()), "emoji_kid": float(kid_mean), "emoji_kid_std": float(kid_std),
            "precision": precision, "recall": recall}


def _uint8_from(pixels: np.ndarray):
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8


def inception_metric(path: str):
    """torchmetrics' standard FID on Inception-v3 weights from a local file; clear errors when it cannot load."""
    import os

    if not os.path.isfile(path):
        raise UserError(f"--inception {path}: no such file; give the local Inception-v3 FID weights "
                        "(pt_inception-2015-12-05-6726825d.pth, as torch-fidelity downloads them)")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=path)
    except ModuleNotFoundError as e:
        raise UserError(f"--inception needs the torch-fidelity package ({e}); pip install torch-fidelity") from None
    except Exception as e:
        raise UserError(f"--inception {path}: the weights do not load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


def vae_reconstruction(vae, images, size: int, key_colour: str, batch: int = 64, alpha=None) -> dict:
    """The VAE's reconstruction MSE of `images` in [-1, 1] pixels, colour and alpha apart. A 3-channel VAE sees
    the images on `key_colour`; when the model's alpha is keyed (`alpha`, its card's `ImageAlpha`: "key"), its
    alpha error is that of keying each reconstruction as inference does, against the true alpha, and None for
    an opaque model. `visible_mse`: what a viewer sees, the reconstruction (keyed, for a keyed model) on
    mid-grey against the image on mid-grey; the colour of a 4-channel VAE's (nearly) transparent pixels, which
    `rgb_mse` counts, shows in it only as much as it shows."""
    import torch
    from PIL import Image

    from emoji_ldm.imaging import model_pixels
    from emoji_ldm.inference.sampler import to_rgba
    from emoji_ldm.models.builders import on_grey

    channels = vae.config.in_channels
    keyed = channels == 3 and alpha is not None and alpha.alpha == "key"
    rgb, alpha_se, visible, n = 0.0, 0.0, 0.0, 0
    for i in range(0, len(images), batch):
        x = np.stack([model_pixels(im, size, channels, key_colour) for im in images[i:i + batch]])
        x = torch.from_numpy(x).to(vae.device, vae.dtype)  # (B, C, H, W)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        colour = float(((y[:, :3] - x[:, :3]) ** 2).mean())
        rgb += colour * len(x)
        if channels == 4:
            alpha_se += float(((y[:, 3] - x[:, 3]) ** 2).mean()) * len(x)
            visible += float(((on_grey(y.float()) - on_grey(x.float())) ** 2).mean()) * len(x)
        elif keyed:  # key the reconstructions, (B, H, W, 4) RGBA against the images' own
            drawn = ((y.float().permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
            got = np.stack([np.asarray(to_rgba(Image.fromarray(d, "RGB"), alpha)) for d in drawn])
            got = torch.from_numpy(got.transpose(0, 3, 1, 2) / 127.5 - 1.0).float()  # (B, 4, H, W)
            truth = torch.from_numpy(np.stack([model_pixels(im, size, 4, None) for im in images[i:i + batch]]))
            alpha_se += float(((got[:, 3] - truth[:, 3]) ** 2).mean()) * len(x)
            visible += float(((on_grey(got) - on_grey(truth)) ** 2).mean()) * len(x)
        else:  # opaque: seen as it is
            visible += colour * len(x)
        n += len(x)
    return {"channels": channels, "rgb_mse": rgb / n,
            "alpha_mse": alpha_se / n if channels == 4 or keyed else None, "alpha_keyed": keyed,
            "visible_mse": visible / n}


def generate_samples(pipe, prompts: list[str], s, batch: int = 64, alpha=None) -> list:
    from emoji_ldm.inference.sampler import run_pipeline

    images = []
    for i in range(0, len(prompts), batch):  # image k from seed + k, whatever the batching
        images += run_pipeline(pipe, prompts[i:i + batch], steps=s.steps, guidance=s.guidance, seed=s.seed + i,
                               alpha=alpha)
    return images


def evaluate(config: EvalConfig) -> dict:
    import torch

    from emoji_ldm.eval.judge import load_judge, row_label
    from emoji_ldm.imaging import alpha_figures, composite
    from emoji_ldm.inference.sampler import ImageAlpha, inference_device, load_pipeline, model_card
    from emoji_ldm.models.builders import noise_scheduler
    from emoji_ldm.models.presets import preset_from_dict
    from emoji_ldm.store.latents import decode_latents, open_latent_table

    # everything that can be wrong with the inputs fails here, before sampling
    ref, table, meta = open_latent_table(config.data)
    judge = load_judge(config.judge) if config.judge else None
    inception = inception_metric(config.inception) if config.inception else None
    pipe = load_pipeline(config.model, device=inference_device(config.use_gpu)) if config.model else None
    s = config.sampler

    heldout = dataset_rows(meta, "val", config.samples)
    prompts = heldout["caption"]
    report = {"model": config.model or "real training images (--real)", "latent_table": f"{ref.uri}@{table.version()}",
              "dataset": f"{meta['dataset']}@{meta['dataset_version']}", "samples": len(prompts),
              "real": config.real, "judge": None, "inception_fid": None, "clip_score": None,
              "heldout_loss": None, "near_copy_share": None}
    if config.real:
        images = dataset_rows(meta, "train", len(prompts))["image"]
    else:
        preset = preset_from_dict(meta["preset"])
        val = _val_rows(table, config.val_rows)
        decoded = decode_latents({k: val.column(k).to_pylist() for k in ("latent", "latent_shape", "text_emb",
                                                                          "text_shape")})
        report.update(val_rows=val.num_rows, timesteps=list(TIMESTEPS), heldout_loss=heldout_loss(
            pipe.unet, noise_scheduler(preset), torch.from_numpy(decoded["latent"]).float(),
            torch.from_numpy(decoded["text_emb"]).float(), seed=s.seed))
        image_alpha = ImageAlpha.of(model_card(config.model))
        images = generate_samples(pipe, prompts, s, alpha=image_alpha)
        size = images[0].size[0]
        sample_px = np.stack([np.asarray(composite(im), dtype=np.float32).ravel() / 255.0 for im in images])
        nearest = nearest_training_mse(meta, sample_px, size)
        report.update(near_copy_share=float((nearest < config.near_copy).mean()), near_copy_threshold=config.near_copy,
                      nearest_mse_median=float(np.median(nearest)))
        report["vae_reconstruction"] = vae_reconstruction(pipe.vae, heldout["image"], size,
                                                          preset.vae.key_colour, alpha=image_alpha)
    report["alpha"] = {"real": alpha_figures(heldout["image"]), "samples": alpha_figures(images)}

    if judge is not None:
        labels = [row_label(judge.meta["label"], u, t, g)
                  for u, t, g in zip(heldout["source_url"], heldout["title"], heldout["tag"])]
        classes = set(judge.classes)
        known = [i for i, y in enumerate(labels) if y in classes]
        real_px, fake_px = judge.pixels(heldout["image"]), judge.pixels(images)  # (N, S, S, 3) uint8, once each
        real_pred = judge.predict(real_px[known]) if known else []
        # --real, the floor: real images in the samples' place, measured against their own classes
        fake_pred = real_pred if config.real or not known else judge.predict(fake_px[known])
        truth = [labels[i] for i in known]
        report.update(judge_metrics(judge, real_px, fake_px))
        report.update(
            judge={"uri": config.judge, "label": judge.meta["label"], "classes": len(judge.classes),
                   "val_accuracy": judge.meta.get("val_accuracy"), "dataset": judge.meta.get("dataset")},
            prompt_accuracy=float(np.mean([p == y for p, y in zip(fake_pred, truth)])) if known else None,
            real_accuracy=float(np.mean([p == y for p, y in zip(real_pred, truth)])) if known else None,
            labelled_samples=len(known))
    if inception is not None:
        inception.update(_uint8(heldout["image"]), real=True)
        inception.update(_uint8(images), real=False)
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
        lines.append("  emoji-FID/KID, precision/recall, prompt accuracy: not computed "
                     "(pass --judge URI from `emoji-ldm train-judge`)")
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
