"""What a 4-channel VAE is given for the colour of an RGBA emoji, and how well it gives it back (issue 25).

The RGBA models' VAE reconstructs colour worse than the RGB one (bench/HISTORY.md), and the UNet cannot draw
better than its autoencoder. One suspect is the colour it is given: straight RGB with transparent pixels zeroed,
every emoji on black, its silhouette a hard edge of the largest contrast. This trains the `--preset`'s own VAE
three times, one process, the same seed, steps, batches and held-out images (every 8th Twemoji), on:

  1. ours, `straight`: straight RGBA, transparent colour black (what `alpha.model_pixels` gives today);
  2. ours, `grey`: the colour composited onto mid-grey, plus alpha (straight colour comes back exactly
     where alpha > 0: c = grey + (rgb - grey) / a);
  3. peer, `rgb-white`: the 3-channel VAE on emoji composited onto white (the RGB tables of before).

and reports, on the held-out images, the MSE (pixels in [-1, 1]) of each reconstruction composited onto
white (what all three can be compared on), onto mid-grey (what the judge sees), and of alpha.

    .venv/bin/python bench/vae_alpha.py [--preset tiny] [--steps N] [--encodings straight,grey,rgb-white]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from common import row, timed, write_record

GREY = 128 / 255


def twemoji_rgba(size: int) -> np.ndarray:
    """(N, 4, size, size) straight RGBA in [0, 1], transparent colour zeroed, resized premultiplied."""
    from PIL import Image

    from emoji_ldm.imaging import resize_rgba
    from emoji_ldm.sources.twemoji import twemoji_dir

    images = [np.asarray(resize_rgba(Image.open(p), (size, size)), np.float32) / 255
              for p in sorted(twemoji_dir().glob("*.png"))]
    return np.stack(images).transpose(0, 3, 1, 2)


def over(rgba: torch.Tensor, background: float) -> torch.Tensor:
    """(N, 4, H, W) straight RGBA in [0, 1] over a flat grey level: (N, 3, H, W)."""
    a = rgba[:, 3:]
    return rgba[:, :3] * a + background * (1 - a)


ENCODINGS = {  # name -> (channels, to model pixels in [-1, 1] from straight RGBA in [0, 1], back)
    "straight": (4, lambda x: x * 2 - 1, lambda y: (y + 1) / 2),
    "grey": (4, lambda x: torch.cat([over(x, GREY), x[:, 3:]], 1) * 2 - 1,
             lambda y: torch.cat([GREY + ((y[:, :3] + 1) / 2 - GREY) / ((y[:, 3:] + 1) / 2).clamp_min(1e-3),
                                  (y[:, 3:] + 1) / 2], 1).clamp(0, 1)),
    "rgb-white": (3, lambda x: over(x, 1.0) * 2 - 1, None),
}


def train_and_measure(name: str, preset, train: torch.Tensor, held: torch.Tensor, steps: int) -> dict:
    from dataclasses import replace

    from emoji_ldm.models.builders import VAEWithLoss, build_vae

    channels, encode, decode = ENCODINGS[name]
    spec = replace(preset.vae, channels=channels)
    torch.manual_seed(preset.train.seed)
    model = VAEWithLoss(build_vae(replace(preset, vae=spec)))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.train_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
                                              * 0.9 + 0.1)  # as train/vae.py
    gen = torch.Generator().manual_seed(preset.train.seed * 1000)
    pixels = encode(train)  # (N, C, H, W) in [-1, 1]
    def step() -> None:
        x = pixels[torch.randint(0, len(pixels), (spec.train_batch_size,), generator=gen)]
        recon, kl = model(x, gen)
        loss = (torch.nn.functional.mse_loss(recon, x) + 0.5 * torch.nn.functional.l1_loss(recon, x)
                + spec.kl_weight * kl.mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds, _ = timed(lambda: [step() for _ in range(steps)])
    model.eval()
    with torch.no_grad():
        vae = model.vae
        y = vae.decode(vae.encode(encode(held)).latent_dist.mean).sample.clamp(-1, 1)  # (N, C, H, W)
    mse = lambda a, b: float(((a - b) * 2).pow(2).mean())  # in [-1, 1] units, as eval reports
    if decode is None:
        return {"white": mse((y + 1) / 2, over(held, 1.0)), "grey": None, "alpha": None, "seconds": seconds}
    rgba = decode(y)
    return {"white": mse(over(rgba, 1.0), over(held, 1.0)), "grey": mse(over(rgba, GREY), over(held, GREY)),
            "alpha": mse(rgba[:, 3], held[:, 3]), "seconds": seconds}


def main() -> None:
    from emoji_ldm.models.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=[n for n, p in PRESETS.items() if p.vae.trained_here])
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's vae.train_steps")
    parser.add_argument("--encodings", default=",".join(ENCODINGS), help="which to train, comma-separated")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    steps = args.steps or preset.vae.train_steps
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = torch.from_numpy(twemoji_rgba(preset.image_size))
    held, train = images[::8], images[torch.arange(len(images)) % 8 != 0]
    print(f"{args.preset}: {len(train)} training and {len(held)} held-out Twemoji at {preset.image_size} px, "
          f"{steps} VAE steps of {preset.vae.train_batch_size}")
    results = {}
    for name in args.encodings.split(","):
        results[name] = r = train_and_measure(name, preset, train, held, steps)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"
        print(f"  {name:9s}: MSE on white {fmt(r['white'])}, on mid-grey {fmt(r['grey'])}, alpha {fmt(r['alpha'])} "
              f"({r['seconds']:.0f} s)", flush=True)
    peer = results.get("rgb-white", {}).get("white")
    rows = [row("transparency: vae", f"MSE on white (lower is better), {steps} steps: {n} vs rgb-white", r["white"],
                peer) for n, r in results.items() if n != "rgb-white" and peer]
    print("\n".join(f"{r['metric'].split(': ')[1]}, MSE on white: {r['ratio']:.2f}x" for r in rows))
    write_record("vae_alpha", {"steps": steps, **results}, rows, about="the VAE alone; peer: 3 channels on white.")


if __name__ == "__main__":
    main()
