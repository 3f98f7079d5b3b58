"""The demo's VAE: what its reconstruction gets from batch, steps, learning rate, latent channels, loss and width.

    .venv/bin/python bench/demo_vae_sweep.py --make-npz demo-out/twemoji --npz twemoji32.npz   # here
    python bench/demo_vae_sweep.py --npz twemoji32.npz --device cuda > sweep.jsonl            # anywhere
    .venv/bin/python bench/demo_vae_sweep.py --record sweep.jsonl                              # the record

The `tiny` preset's AutoencoderKL as `emoji-ldm train-vae` builds and trains it (4 channels, straight RGBA,
MSE + 0.5 L1 + 1e-6 KL, AdamW with weight decay 1e-4, gradient clip 1, the cosine from 1 to 0.1), in plain
torch on one device: no Ray, so it runs where only torch and diffusers are installed (a GPU machine; the
arithmetic is fp32 there too). The images: a demo dataset's, decoded at 32 px as train-vae decodes them (400
held out at random; "base" rows are those without a skin-tone modifier). The figure: the held-out images'
mean squared error as seen on mid-grey (`eval`'s `visible_mse`), with the colour and alpha errors apart.
"""

from __future__ import annotations

import json
import math
import time

CONFIGS = [  # name -> overrides of run()'s defaults: the demo's VAE before (300 steps of 32)
    ("A 300x32", {}), ("A2 300x32 seed 1", {"seed": 1}), ("B premultiplied", {"loss": "premultiplied"}),
    ("C latent 8", {"lc": 8}), ("D latent 8 premultiplied", {"lc": 8, "loss": "premultiplied"}),
    ("E lr 2e-3", {"lr": 2e-3}), ("E2 lr 3e-3", {"lr": 3e-3}), ("L latent 16", {"lc": 16}),
    ("C2 latent 8 lr 2e-3", {"lc": 8, "lr": 2e-3}), ("S (16,32,64)", {"blocks": (16, 32, 64)}),
    ("S2 (32,64,128)", {"blocks": (32, 64, 128)}), ("U 2 levels (32,64): 16x16 latents", {"blocks": (32, 64)}),
    ("T base rows only", {"base": True}), ("H 600x32", {"steps": 600}), ("I 1000x32", {"steps": 1000}),
    ("F9 600x8", {"batch": 8, "steps": 600}), ("F7 900x8", {"batch": 8, "steps": 900}),
    ("F 600x16", {"batch": 16, "steps": 600}), ("G 600x16 lr 2e-3", {"batch": 16, "steps": 600, "lr": 2e-3}),
    ("F2 1200x8", {"batch": 8, "steps": 1200}), ("F4 1200x8 lr 2e-3", {"batch": 8, "steps": 1200, "lr": 2e-3}),
    ("F5 1200x8 latent 8", {"batch": 8, "steps": 1200, "lc": 8}),
    ("F6 1200x8 premultiplied", {"batch": 8, "steps": 1200, "loss": "premultiplied"}),
    ("F8 1200x8 base rows only", {"batch": 8, "steps": 1200, "base": True}),
    ("F10 1200x16", {"batch": 16, "steps": 1200}), ("F3 2400x4", {"batch": 4, "steps": 2400}),
]


def make_npz(dataset: str, path: str) -> None:
    """A demo dataset's images at 32 px (uint8 RGBA, (N, 4, 32, 32)) and which have a skin-tone modifier."""
    import deltalake
    import numpy as np

    from emoji_ldm.train.data import decode_images

    table = deltalake.DeltaTable(dataset).to_pyarrow_table(columns=["image", "source_url"])
    px = decode_images({"image": table.column("image").to_pylist()}, 32, 4)["pixels"]  # (N, 4, 32, 32) [-1, 1]
    tones = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
    skin = [bool(tones & set(u.rsplit("/", 1)[-1].rsplit(".", 1)[0].split("-")))
            for u in table.column("source_url").to_pylist()]
    np.savez_compressed(path, px=np.round((px.astype(np.float32) + 1) * 127.5).clip(0, 255).astype(np.uint8),
                        skin=np.array(skin))


def run(data, name: str, device: str, steps=300, batch=32, lr=1e-3, lc=4, blocks=(32, 64, 64),
        loss="straight", base=False, seed=0) -> dict:
    import torch
    from diffusers import AutoencoderKL

    px, skin, held, train = data
    torch.manual_seed(seed)
    rows = px[train[~skin[train]] if base else train].to(device)
    vae = AutoencoderKL(in_channels=4, out_channels=4, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                        layers_per_block=1, latent_channels=lc, norm_num_groups=min(32, min(blocks)),
                        sample_size=32, mid_block_add_attention=False).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    t0 = time.time()
    for _ in range(steps):
        x = rows[torch.randint(0, len(rows), (batch,), device=device)]  # (B, 4, 32, 32)
        dist = vae.encode(x).latent_dist
        r = vae.decode(dist.sample()).sample
        a, b = (premultiplied(r), premultiplied(x)) if loss == "premultiplied" else (r, x)
        total = (torch.nn.functional.mse_loss(a, b) + 0.5 * torch.nn.functional.l1_loss(a, b)
                 + 1e-6 * dist.kl().mean())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
    vae.eval()
    out = {"name": name, "steps": steps, "batch": batch, "lr": lr, "latent_channels": lc, "blocks": list(blocks),
           "loss": loss, "base_rows_only": base, "seed": seed, "seconds": round(time.time() - t0, 1)}
    with torch.no_grad():
        for tag, sel in (("all", torch.ones(len(held), dtype=torch.bool)), ("base", ~skin[held])):
            x = px[held[sel]].to(device)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            out[f"{tag}_visible"] = round(float(((on_grey(y) - on_grey(x)) ** 2).mean()), 4)
            out[f"{tag}_rgb"] = round(float(((y[:, :3] - x[:, :3]) ** 2).mean()), 4)
            out[f"{tag}_alpha"] = round(float(((y[:, 3] - x[:, 3]) ** 2).mean()), 4)
    return out


def premultiplied(x):
    import torch

    a = (x[:, 3:] + 1) / 2  # (B, 1, H, W) in [0, 1]
    return torch.cat([((x[:, :3] + 1) / 2 * a) * 2 - 1, x[:, 3:]], 1)  # colour x alpha, as train-vae's loss


def on_grey(x):
    return x[:, :3] * (x[:, 3:] + 1) / 2  # (B, 3, H, W): composited on mid-grey (0), as eval sees it


def sweep(npz: str, device: str, only: list[str]) -> None:
    import numpy as np
    import torch

    d = np.load(npz)
    px = torch.from_numpy(d["px"].astype(np.float32) / 127.5 - 1.0)
    perm = torch.randperm(len(px), generator=torch.Generator().manual_seed(0))
    data = (px, torch.from_numpy(d["skin"]), perm[:400], perm[400:])
    for name, kw in CONFIGS:
        if not only or name.split()[0] in only:
            print(json.dumps(run(data, name, device, **kw)), flush=True)


def record(paths: list[str], device: str) -> None:
    from common import row, write_record

    runs = []
    for p in paths:  # (the first sweep's lines named latent_channels "lc" and base_rows_only "base")
        for line in open(p):
            if line.startswith("{"):
                r = json.loads(line)
                r.setdefault("latent_channels", r.pop("lc", 4))
                r.setdefault("base_rows_only", r.pop("base", False))
                runs.append(r)

    def find(steps: int, batch: int) -> float:  # the demo's VAE but for steps and batch
        return next(r["all_visible"] for r in runs if r["steps"] == steps and r["batch"] == batch and
                    r["lr"] == 1e-3 and r["latent_channels"] == 4 and r["loss"] == "straight" and
                    not r["base_rows_only"] and list(r["blocks"]) == [32, 64, 64] and r.get("seed", 0) == 0)

    area = "make: demo's VAE"
    rows = [row(area, "held-out error as seen on mid-grey: 1,200 steps of 8 vs 300 of 32 (the same images)",
                find(1200, 8), find(300, 32), "", None, f"on {device}; lower is better"),
            row(area, "the same: 1,200 steps of 8 vs 1,000 of 32 (the preset's; 3.3x the images)",
                find(1200, 8), find(1000, 32), ""),
            row(area, "the same: 600 steps of 32 vs 300 of 32", find(600, 32), find(300, 32), "")]
    write_record("demo_vae_sweep", {"device": device, "runs": runs}, rows,
                 about="the `tiny` VAE trained as train-vae trains it, in plain torch; held-out Twemoji at 32 px")


def main() -> None:
    from common import sweep_main

    sweep_main(__doc__, make_npz, sweep, record, "DATASET")

if __name__ == "__main__":
    main()
