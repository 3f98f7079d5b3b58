"""The demo's pixel model (`pixel32`): what held-out prompt accuracy gets from learning rate, text length, schedule,
EMA, caption dropout, batch, width and depth, extra conditioning, and the sampler.

    .venv/bin/python bench/demo_unet_sweep.py --make-npz DEMO_OUT --npz unet32.npz    # here, from a finished demo
    python bench/demo_unet_sweep.py --npz unet32.npz --device cuda --procs 8 > sweep.jsonl   # anywhere (a GPU)
    .venv/bin/python bench/demo_unet_sweep.py --record sweep.jsonl --device "one NVIDIA H200"  # the record

Each config trains the `pixel32` UNet as `train` does (8x8x64 pixel patches, the clean image as target, AdamW with
weight decay 1e-2, 50 warm-up steps then a cosine to a tenth, gradient clip 1, EMA, 10% caption dropout, batch 64,
1,000 steps), in plain torch on one device (no Ray: it runs where only torch and diffusers are installed; fp32 on
a GPU as here). Then its EMA draws every held-out caption 4 times (seeds 0-3) with each sampler, and the demo's
judge (DEMO_OUT/judge) scores prompt accuracy as `eval` does: the share put in the caption's row's subgroup.
Text embeddings (MiniLM, 16 and 32 tokens) are computed here and carried as int8 with a scale per token (max
error 0.02 against values up to 6), so the npz fits what a GPU call carries.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # emoji_ldm from the working tree

BASE = dict(text=16, lr=5e-4, min_lr=5e-5, warm=50, steps=1000, bs=64, ema=0.995, drop=0.1, wd=1e-2,
            blocks=(64, 128), lpb=1, down=("CrossAttnDownBlock2D", "DownBlock2D"),
            up=("UpBlock2D", "CrossAttnUpBlock2D"), sched="scaled_linear", zsnr=False, classemb=False, seed=0, heads=8,
            keep="all")
T32 = dict(text=32)  # 32 text tokens: at 16, 98% of the demo's captions are cut (their colour words among them)
ATTN2 = dict(down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {  # name -> overrides of BASE (the preset before: lr 5e-4)
    "base16": {}, "base16-s1": dict(seed=1),
    "t32": T32, "t32-s1": dict(T32, seed=1),
    "t32-lr1e-3": dict(T32, lr=1e-3, min_lr=1e-4), "t32-lr2e-3": dict(T32, lr=2e-3, min_lr=2e-4),
    "t32-cos": dict(T32, sched="squaredcos_cap_v2"), "t32-zsnr": dict(T32, zsnr=True),
    "t32-ema.99": dict(T32, ema=0.99), "t32-ema.999": dict(T32, ema=0.999),
    "t32-drop0": dict(T32, drop=0.0), "t32-drop.2": dict(T32, drop=0.2), "t32-wd0": dict(T32, wd=0.0),
    "t32-b128x500": dict(T32, bs=128, steps=500), "t32-2000": dict(T32, steps=2000),
    "t32-narrow2000": dict(T32, blocks=(32, 64), steps=2000), "t32-wide": dict(T32, blocks=(96, 192)),
    "t32-lpb2": dict(T32, lpb=2), "t32-attn2": dict(T32, **ATTN2),
    "t32-3lvl": dict(T32, blocks=(64, 128, 128), down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "t32-classemb": dict(T32, classemb=True), "base16-classemb": dict(classemb=True),
    "t32-heads4": dict(T32, heads=4), "t32-heads16": dict(T32, heads=16),
    "t32-lr1e-3-attn2": dict(T32, lr=1e-3, min_lr=1e-4, **ATTN2),
    "t32-lr1e-3-classemb": dict(T32, lr=1e-3, min_lr=1e-4, classemb=True),
    "lr2e-3": dict(lr=2e-3, min_lr=2e-4), "lr2e-3-s1": dict(lr=2e-3, min_lr=2e-4, seed=1),
    "t32-lr2e-3-s1": dict(T32, lr=2e-3, min_lr=2e-4, seed=1),
    "lr3e-3": dict(lr=3e-3, min_lr=3e-4), "lr4e-3": dict(lr=4e-3, min_lr=4e-4),
    "lr2e-3-attn2": dict(lr=2e-3, min_lr=2e-4, **ATTN2),
    "lr2e-3-ema.99": dict(lr=2e-3, min_lr=2e-4, ema=0.99), "lr2e-3-classemb": dict(lr=2e-3, min_lr=2e-4, classemb=True),
}
# the preset's lr (3e-3) with three seeds each: is cross-attention at both levels, the [CLS] class embedding, or more
# caption dropout worth it against the seed-to-seed spread?
LR3 = dict(lr=3e-3, min_lr=3e-4)
for _name, _over in {"": {}, "-attn2": ATTN2, "-classemb": dict(classemb=True),
                     "-attn2-classemb": dict(ATTN2, classemb=True), "-drop.2": dict(drop=0.2)}.items():
    for _seed in range(3):
        CONFIGS[f"lr3e-3{_name}" + (f"-s{_seed}" if _seed else "")] = dict(LR3, seed=_seed, **_over)
for _keep in ("noflags", "min10"):  # the data lever: which emoji the demo trains on
    for _seed in range(3):
        CONFIGS[f"lr3e-3-{_keep}" + (f"-s{_seed}" if _seed else "")] = dict(LR3, seed=_seed, keep=_keep)
for _steps in (1400, 2000):  # more steps at the preset's lr (the demo has minutes to spare for ~1,400)
    for _seed in range(3):
        CONFIGS[f"lr3e-3-{_steps}" + (f"-s{_seed}" if _seed else "")] = dict(LR3, seed=_seed, steps=_steps)
# (scheduler, steps, guidance, dynamic thresholding); the first is eval's default
SAMPLERS = [("dpmpp", 25, 5.0, False), ("dpmpp", 25, 3.0, False), ("dpmpp", 25, 8.0, False),
            ("dpmpp", 25, 5.0, True), ("ddim", 50, 5.0, False)]


def make_npz(demo: str, path: str) -> None:
    """The demo's rows in its latent table's order: 32 px RGBA (uint8), held-out flags, judge labels, MiniLM text
    at 16 and 32 tokens (int8 + scale), the empty caption's; and the judge beside the npz."""
    import shutil

    import torch
    from deltalake import DeltaTable
    from PIL import Image

    from emoji_ldm.eval.judge import row_label
    from emoji_ldm.imaging import model_pixels
    from emoji_ldm.models.builders import encode_text, load_text_encoder
    from emoji_ldm.models.presets import get_preset

    lat = DeltaTable(f"{demo}/latents").to_pyarrow_table(columns=["id", "split"]).to_pydict()
    data = DeltaTable(f"{demo}/twemoji").to_pyarrow_table(
        columns=["id", "image", "source_url", "title", "tag", "caption"]).to_pydict()
    where = {i: k for k, i in enumerate(data["id"])}
    rows = [where[i] for i in lat["id"]]
    px = np.stack([model_pixels(Image.open(io.BytesIO(data["image"][r])), 32, 4, None) for r in rows])
    out = {"X": np.round((px + 1) * 127.5).astype(np.uint8), "split": np.array([s == "val" for s in lat["split"]])}
    captions = [data["caption"][r] or data["title"][r] or "" for r in rows]  # what encode embeds
    for length in (16, 32):
        tokenizer, model = load_text_encoder(get_preset("pixel32", {"text.max_length": str(length)}))
        with torch.no_grad():
            text = torch.cat([encode_text(tokenizer, model, captions[i:i + 256], length)[0]
                              for i in range(0, len(captions), 256)]).numpy()  # (N, L, 384)
            out[f"empty{length}"] = encode_text(tokenizer, model, [""], length)[0][0].numpy().astype(np.float16)
        scale = np.abs(text).max(-1, keepdims=True) / 127 + 1e-8
        out[f"text{length}_q"], out[f"text{length}_s"] = np.round(text / scale).astype(np.int8), scale
    meta = json.loads(Path(f"{demo}/judge/judge.json").read_text())
    classes = {c: k for k, c in enumerate(meta["classes"])}
    out["label"] = np.array([classes.get(row_label(meta["label"], data["source_url"][r], data["title"][r],
                                                   data["tag"][r]), -1) for r in rows])
    np.savez_compressed(path, **out)
    shutil.copytree(f"{demo}/judge", judge_folder(path), dirs_exist_ok=True)


def judge_folder(npz: str) -> Path:
    """The demo's judge, copied beside the npz (`--make-npz`) so that both travel together."""
    return Path(npz).with_name(f"{Path(npz).stem}-judge")


def kept_rows(keep: str, label: np.ndarray, held: np.ndarray, flag: int) -> np.ndarray:
    """Which rows a config trains on: all; all but the country flags (14% of the rows, the judge's largest class);
    or only the classes with at least 10 training rows (and the unlabelled ones)."""
    if keep == "all":
        return np.ones(len(label), bool)
    if keep == "noflags":
        return label != flag
    if keep == "min10":
        counts = np.bincount(label[~held & (label >= 0)], minlength=label.max() + 1)
        return (label < 0) | (counts[np.maximum(label, 0)] >= 10)
    raise ValueError(f"keep={keep!r}: all, noflags or min10")


def run(job) -> dict:
    name, over, npz, device = job
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
    from PIL import Image

    from emoji_ldm.eval.judge import load_judge
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.ldm import _lr_lambda

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32, as on the CPU
    c = dict(BASE, **over)
    d = np.load(npz)
    length = c["text"]
    text = torch.from_numpy(d[f"text{length}_q"].astype(np.float32) * d[f"text{length}_s"]).to(device)  # (N, L, D)
    empty = torch.from_numpy(d[f"empty{length}"].astype(np.float32)).to(device)  # (L, D)
    X = F.pixel_unshuffle(torch.from_numpy(d["X"]).float().to(device) / 127.5 - 1, 4)  # (N, 64, 8, 8)
    held, label = d["split"], d["label"]
    judge = load_judge(str(judge_folder(npz)))
    classes = np.array(judge.classes)
    kept = kept_rows(c["keep"], label, held, judge.classes.index("country-flag"))
    train = np.where(~held & kept)[0]
    judged = np.where(held & (label >= 0))[0]
    torch.manual_seed(c["seed"])
    extra = dict(class_embed_type="projection", projection_class_embeddings_input_dim=384) if c["classemb"] else {}
    unet = UNet2DConditionModel(sample_size=8, in_channels=64, out_channels=64, block_out_channels=c["blocks"],
                                layers_per_block=c["lpb"], down_block_types=c["down"], up_block_types=c["up"],
                                cross_attention_dim=384, attention_head_dim=c["heads"],
                                norm_num_groups=min(32, min(c["blocks"])), **extra).to(device).train()
    ema = [p.detach().clone() for p in unet.parameters()]
    noise = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=c["sched"],
                          prediction_type="sample", rescale_betas_zero_snr=c["zsnr"])
    noise.alphas_cumprod = noise.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=c["lr"], weight_decay=c["wd"])
    steps = c["steps"]
    recipe = get_preset("pixel32", {"train.lr": str(c["lr"]), "train.min_lr": str(c["min_lr"]),
                                    "train.warmup_steps": str(c["warm"]), "train.max_steps": str(steps)})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))  # train's warm-up and cosine
    rng, g = np.random.default_rng(c["seed"]), torch.Generator(device).manual_seed(c["seed"])

    def pooled(h):  # the [CLS] token as a class embedding (the classemb configs)
        return h[:, 0] if c["classemb"] else None

    start = time.time()
    for _ in range(steps):
        b = torch.from_numpy(rng.choice(train, c["bs"], replace=False)).to(device)
        x, ct = X[b], text[b]
        ct = torch.where((torch.rand(len(b), device=device, generator=g) < c["drop"]).view(-1, 1, 1), empty, ct)
        eps = torch.randn(x.shape, device=device, generator=g)
        t = torch.randint(0, 1000, (len(b),), device=device, generator=g)
        loss = F.mse_loss(unet(noise.add_noise(x, eps, t), t, encoder_hidden_states=ct,
                               class_labels=pooled(ct)).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - c["ema"])
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - start
    with torch.no_grad():
        for p, e in zip(unet.parameters(), ema):
            p.copy_(e)
    unet.eval()
    reps = 4
    prompts = np.repeat(judged, reps)  # each held-out caption, seeds 0-3
    results = {}
    for sampler_name, n_steps, guidance, threshold in SAMPLERS:
        kw = dict(rescale_betas_zero_snr=c["zsnr"], **({"timestep_spacing": "trailing"} if c["zsnr"] else {}))
        sampler = (DPMSolverMultistepScheduler.from_config(noise.config, algorithm_type="dpmsolver++",
                                                           thresholding=threshold, **kw)
                   if sampler_name == "dpmpp" else DDIMScheduler.from_config(noise.config, **kw))
        gen = torch.Generator(device).manual_seed(0)
        images = []
        with torch.no_grad():
            for s0 in range(0, len(prompts), 256):
                bi = torch.from_numpy(prompts[s0:s0 + 256]).to(device)
                hidden = torch.cat([empty.expand(len(bi), *empty.shape), text[bi]])  # (2B, L, D)
                x = torch.randn((len(bi), 64, 8, 8), device=device, generator=gen)
                sampler.set_timesteps(n_steps)
                for t in sampler.timesteps:
                    uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=hidden,
                                        class_labels=pooled(hidden)).sample.chunk(2)
                    x = sampler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
                y = F.pixel_shuffle(x, 4).clamp(-1, 1)  # (B, 4, 32, 32)
                images.append(((y.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy())
        predicted = judge.predict(judge.pixels([Image.fromarray(a, "RGBA") for a in np.concatenate(images)]))
        right = np.array(predicted) == classes[label[prompts]]  # as eval scores: on mid-grey, the judge's class
        key = f"{sampler_name}{n_steps}-g{guidance:g}{'-thr' if threshold else ''}"
        by_label = {int(k): [int(right[label[prompts] == k].sum()), int((label[prompts] == k).sum())]
                    for k in np.unique(label[prompts])}  # label -> [right, drawn]: any subset's accuracy, later
        results[key] = {"acc": float(right.mean()), "per_seed": [float(right[k::reps].mean()) for k in range(reps)],
                        "by_label": by_label}
    return {"name": name, "config": over, "kept_labels": sorted({int(k) for k in label[held & kept & (label >= 0)]}),
            "params": sum(p.numel() for p in unet.parameters()), "train_s": train_s,
            "final_loss": float(loss.detach()), "results": results, "val_prompts": int(len(judged))}


def sweep(npz: str, device: str, only: list[str], procs: int = 1) -> None:
    import multiprocessing as mp

    jobs = [(name, over, npz, device) for name, over in CONFIGS.items() if not only or name in only]
    with mp.get_context("spawn").Pool(procs) as pool:  # small models: several share one GPU
        for result in pool.imap_unordered(run, jobs):
            print(json.dumps(result), flush=True)


def record(paths: list[str], device: str) -> None:
    from common import row, write_record

    runs = {}
    for p in paths:
        for line in open(p):
            if line.startswith("{"):
                r = json.loads(line)
                runs[r["name"]] = r

    def acc(*names, sampler="dpmpp25-g5", on=None):
        """Prompt accuracy of these runs; `on`: only on the held-out rows of the classes that run trained on."""
        if on is None:
            return [runs[n]["results"][sampler]["acc"] for n in names]
        labels = {str(k) for k in runs[on]["kept_labels"]}
        counts = [[v for k, v in runs[n]["results"][sampler]["by_label"].items() if k in labels] for n in names]
        return [sum(r for r, _ in c) / sum(t for _, t in c) for c in counts]

    area = "make: demo's UNet"
    note = f"on {device}; held-out captions x 4 sampling seeds, the demo's judge; training seeds paired"
    seeds = ("", "-s1", "-s2")

    def three(name):
        return [f"{name}{s}" for s in seeds]

    rows = [row(area, "prompt accuracy: lr 3e-3 (the preset) vs 5e-4 (before), 1,000 steps", acc("lr3e-3"),
                acc("base16", "base16-s1"), "", None, note),
            row(area, "the same, 3 seeds: cross-attention at both levels vs one (1.2x the CPU step)",
                acc(*three("lr3e-3-attn2")), acc(*three("lr3e-3")), ""),
            row(area, "the same, 3 seeds: 1,400 steps vs 1,000 (2,000: no better)", acc(*three("lr3e-3-1400")),
                acc(*three("lr3e-3")), ""),
            row(area, "the same, 3 seeds, on the held-out emoji but flags: trained without the flags vs with",
                acc(*three("lr3e-3-noflags"), on="lr3e-3-noflags"), acc(*three("lr3e-3"), on="lr3e-3-noflags"), ""),
            row(area, "the same, 3 seeds, on the held-out emoji of classes of 10+ rows: trained on those vs all",
                acc(*three("lr3e-3-min10"), on="lr3e-3-min10"), acc(*three("lr3e-3"), on="lr3e-3-min10"), "")]
    write_record("demo_unet_sweep", {"device": device, "runs": list(runs.values())}, rows,
                 about="the `pixel32` UNet trained as `train` trains it, in plain torch; the demo's held-out rows")


def main() -> None:
    from common import sweep_main

    sweep_main(__doc__, make_npz, sweep, record, "DEMO_OUT", procs=True)

if __name__ == "__main__":
    main()
