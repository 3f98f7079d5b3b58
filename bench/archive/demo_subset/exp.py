"""Experiment: pixel UNet on (a subset of) base Twemoji, then sample the 24 naming prompts."""
import json, sys, time
import numpy as np
import torch, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from PIL import Image
from emoji_ldm.models.builders import encode_text, load_text_encoder
from emoji_ldm.models.presets import get_preset

NAMING = ["grinning face", "face with tears of joy", "smiling face with heart-eyes", "loudly crying face",
          "angry face", "smiling face with sunglasses", "red heart", "thumbs up", "fire", "cat face", "dog face",
          "pizza", "ghost", "sun", "rocket", "birthday cake", "hamburger", "rainbow", "banana", "pile of poo",
          "snowman", "party popper", "star", "watermelon"]
EVERYDAY = {"Smileys & Emotion"}
EXTRA_SUBS = {"animal-mammal", "animal-bird", "animal-marine", "food-fruit", "food-prepared", "food-sweet",
              "sky & weather", "event", "hand-fingers-closed", "transport-air"}

def caption_form(name, m):
    i = m["names"].index(name) if name in m["names"] else None
    tag = m["tags"][i].lower() if i is not None else ""
    return f"{name} emoji ({tag})" if tag else f"{name} emoji"

def main(cfg):
    torch.set_num_threads(cfg.get("threads", 2))
    d = np.load("/tmp/exp/data.npz"); m = json.load(open("/tmp/exp/meta.json"))
    X8, held = d["X"], d["held"]
    n = len(X8)
    keep = np.ones(n, bool)
    if cfg.get("subset") == "everyday":
        keep = np.array([(t in EVERYDAY or s in EXTRA_SUBS) for t, s in zip(m["tags"], m["subs"])])
    naming_idx = [m["names"].index(x) for x in NAMING]
    if cfg.get("train_naming", True):
        held = held.copy(); held[naming_idx] = False
    train = np.where(keep & ~held)[0]
    print("train rows", len(train), "naming held:", [NAMING[k] for k, i in enumerate(naming_idx) if d["held"][i]])
    L = cfg.get("L", 16)
    caps = m["caps"]
    if cfg.get("caps") == "short":
        caps = [c.split(", on a")[0] for c in caps]
    tok, te = load_text_encoder(get_preset("pixel32", {"text.max_length": str(L)}))
    with torch.no_grad():
        text = torch.cat([encode_text(tok, te, caps[i:i+256], L)[0] for i in range(0, n, 256)])
        empty = encode_text(tok, te, [""], L)[0][0]
        prompts = [caption_form(x, m) for x in NAMING]
        ptext = encode_text(tok, te, prompts, L)[0]
    p = cfg.get("patch", 4)
    X = F.pixel_unshuffle(torch.from_numpy(X8).float() / 127.5 - 1, p)  # (N, 4p^2, 32/p, 32/p)
    C, S = X.shape[1], X.shape[2]
    blocks = tuple(cfg.get("blocks", (64, 128)))
    torch.manual_seed(0)
    attn2 = cfg.get("attn2", False)
    down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D" if attn2 else "DownBlock2D")
    up = ("CrossAttnUpBlock2D" if attn2 else "UpBlock2D", "CrossAttnUpBlock2D")
    if len(blocks) == 3:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    unet = UNet2DConditionModel(sample_size=S, in_channels=C, out_channels=C, block_out_channels=blocks,
                                layers_per_block=cfg.get("lpb", 1), down_block_types=down, up_block_types=up,
                                cross_attention_dim=384, attention_head_dim=8,
                                norm_num_groups=min(32, min(blocks))).train()
    print("params", sum(q.numel() for q in unet.parameters()) / 1e6, "M")
    ema = [q.detach().clone() for q in unet.parameters()]
    noise = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=cfg.get("pred", "sample"))
    lr, steps, bs = cfg.get("lr", 3e-3), cfg.get("steps", 1000), cfg.get("bs", 64)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1, s / steps)))))
    rng = np.random.default_rng(0); g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for s in range(steps):
        b = torch.from_numpy(rng.choice(train, bs, replace=False))
        x, ct = X[b], text[b]
        if cfg.get("flip", False):
            pass
        ct = torch.where((torch.rand(len(b), generator=g) < 0.1).view(-1, 1, 1), empty, ct)
        eps = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (len(b),), generator=g)
        out = unet(noise.add_noise(x, eps, t), t, encoder_hidden_states=ct).sample
        loss = F.mse_loss(out, x if noise.config.prediction_type == "sample" else eps)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step(); sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in unet.parameters()], 1 - cfg.get("ema", 0.995))
        if s % 100 == 0:
            print(s, f"{loss.item():.4f}", f"{(time.time()-t0)/(s+1):.3f}s/step", flush=True)
    print("train s", time.time() - t0)
    with torch.no_grad():
        for q, e in zip(unet.parameters(), ema): q.copy_(e)
    unet.eval()
    sampler = DPMSolverMultistepScheduler.from_config(noise.config, algorithm_type="dpmsolver++")
    seeds = cfg.get("seeds", 2)
    hid = ptext.repeat_interleave(seeds, 0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((len(hid), C, S, S), generator=gen)
    guidance = cfg.get("guidance", 5.0)
    sampler.set_timesteps(25)
    with torch.no_grad():
        for t in sampler.timesteps:
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([empty.expand_as(hid), hid])).sample.chunk(2)
            x = sampler.step(u + guidance * (c - u), t, x).prev_sample
    y = ((F.pixel_shuffle(x, p).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    np.save(f"/tmp/exp/{cfg['name']}.npy", y)
    # labelled grid: real | seeds..., scaled 3x, over checker
    from PIL import ImageDraw
    cell = 96
    W = (1 + seeds) * cell + 200
    sheet = Image.new("RGB", (W, cell * len(NAMING)), "white")
    dr = ImageDraw.Draw(sheet)
    chk = Image.new("RGB", (cell, cell), (200, 200, 200))
    for yy in range(0, cell, 12):
        for xx in range(0, cell, 12):
            if (xx // 12 + yy // 12) % 2: chk.paste((240, 240, 240), (xx, yy, xx + 12, yy + 12))
    for r, name in enumerate(NAMING):
        dr.text((4, r * cell + 40), name, fill="black")
        tiles = [X8[naming_idx[r]].transpose(1, 2, 0)] + [y[r * seeds + k] for k in range(seeds)]
        for c_, a in enumerate(tiles):
            im = Image.fromarray(a, "RGBA").resize((cell, cell), Image.NEAREST)
            bg = chk.copy(); bg.paste(im, (0, 0), im)
            sheet.paste(bg, (200 + c_ * cell, r * cell))
    sheet.save(f"/tmp/exp/{cfg['name']}.png")
    print("saved", cfg["name"])

if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
