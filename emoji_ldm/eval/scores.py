"""The measures `eval` reports, each a function of images, features or a model part: the held-out denoising
loss, nearest-image distance, CLIP score, improved precision/recall, emoji-FID/KID in the judge's feature space,
Inception FID, and the VAE's reconstruction error."""

from __future__ import annotations

import numpy as np

from emoji_ldm.errors import UserError

TIMESTEPS = (50, 250, 500, 750, 950)
PR_K = 3  # neighbours for precision/recall (Kynkaanniemi et al. 2019)


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


def uint8_on_grey(images):
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
