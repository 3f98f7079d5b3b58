"""Experiment: pixel UNet on everyday Twemoji, then sample the 24 naming prompts (as the user types them)."""
import json, sys, time
import numpy as np
import torch, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from emoji_ldm.models.builders import encode_text, load_text_encoder
from emoji_ldm.models.presets import get_preset
from emoji_ldm.eval.naming import NAMING, naming_sheet
from emoji_ldm.inference.prompts import model_prompt

def main(cfg):
    torch.set_num_threads(cfg.get("threads", 2))
    d = np.load("/tmp/exp2/data.npz"); m = json.load(open("/tmp/exp2/meta.json"))
    X8, held = d["X"], d["held"]
    n = len(X8)
    names = m["names"]
    naming_idx = [names.index(x) if x in names else -1 for x in NAMING]
    print("naming held out:", [x for x, i in zip(NAMING, naming_idx) if i >= 0 and held[i]], "missing:", [x for x, i in zip(NAMING, naming_idx) if i < 0])
    train = np.where(~held)[0]
    print("train rows", len(train))
    L = cfg.get("L", 16)
    caps = m["caps"]
    tok, te = load_text_encoder(get_preset("pixel32", {"text.max_length": str(L)}))
    with torch.no_grad():
        text = torch.cat([encode_text(tok, te, caps[i:i+256], L)[0] for i in range(0, n, 256)])
        import re
        shorts = [re.match(r"^(.+? emoji(?: \([^)]*\))?)(?:, |$)", c)[1] for c in caps]
        print("short forms", shorts[:2])
        text_short = torch.cat([encode_text(tok, te, shorts[i:i+256], L)[0] for i in range(0, n, 256)])
        empty = encode_text(tok, te, [""], L)[0][0]
        prompts = [model_prompt(x, "metadata") for x in NAMING]
        ptext = encode_text(tok, te, prompts, L)[0]
    print(prompts[:3])
    p = cfg.get("patch", 4)
    X = F.pixel_unshuffle(torch.from_numpy(X8).float() / 127.5 - 1, p)  # (N, 4p^2, 32/p, 32/p)
    C, S = X.shape[1], X.shape[2]
    blocks = tuple(cfg.get("blocks", (64, 128)))
    torch.manual_seed(0)
    down = tuple(cfg.get("down", ("CrossAttnDownBlock2D", "DownBlock2D")))
    up = tuple(cfg.get("up", ("UpBlock2D", "CrossAttnUpBlock2D")))
    unet = UNet2DConditionModel(sample_size=S, in_channels=C, out_channels=C, block_out_channels=blocks,
                                layers_per_block=cfg.get("lpb", 1), down_block_types=down, up_block_types=up,
                                cross_attention_dim=384, attention_head_dim=8, **({'addition_embed_type': 'text', 'addition_embed_type_num_heads': 8} if cfg.get('addtext') else {}),
                                norm_num_groups=min(32, min(blocks))).train()
    if cfg.get("channels_last", True):
        unet = unet.to(memory_format=torch.channels_last)
    print("params", sum(q.numel() for q in unet.parameters()) / 1e6, "M")
    ema = [q.detach().clone() for q in unet.parameters()]
    beta_start, beta_end, beta_schedule = cfg.get("betas", (0.00085, 0.012, "scaled_linear"))
    noise = DDPMScheduler(num_train_timesteps=1000, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule=beta_schedule, prediction_type=cfg.get("pred", "sample"))
    lr, steps, bs = cfg.get("lr", 3e-3), cfg.get("steps", 1000), cfg.get("bs", 64)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1, s / steps)))))
    rng = np.random.default_rng(0); g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for s in range(steps):
        b = torch.from_numpy(rng.choice(train, bs, replace=False))
        x, ct = X[b], text[b]
        if cfg.get("short", 0):
            ct = torch.where((torch.rand(len(b), generator=g) < cfg["short"]).view(-1, 1, 1), text_short[b], ct)
        ct = torch.where((torch.rand(len(b), generator=g) < 0.1).view(-1, 1, 1), empty, ct)
        eps = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (len(b),), generator=g)
        out = unet(noise.add_noise(x, eps, t), t, encoder_hidden_states=ct).sample
        loss = F.mse_loss(out, x if noise.config.prediction_type == "sample" else eps)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step(); sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in unet.parameters()], 1 - cfg.get("ema", 0.995))
        if s % 100 == 0 or s == 9:
            print(s, f"{loss.item():.4f}", f"{(time.time()-t0)/(s+1):.3f}s/step", flush=True)
    print("train s", time.time() - t0)
    if cfg.get("time_only"):
        return
    with torch.no_grad():
        for q, e in zip(unet.parameters(), ema): q.copy_(e)
    unet.eval()
    torch.save(unet.state_dict(), f"/tmp/exp2/{cfg['name']}.pt")
    sample(cfg, unet, noise, ptext, empty, C, S, p, X8, naming_idx)

def sample(cfg, unet, noise, ptext, empty, C, S, p, X8, naming_idx):
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
    np.save(f"/tmp/exp2/{cfg['name']}.npy", y)
    cell = 96
    W = (1 + seeds) * cell + 200
    sheet = Image.new("RGB", (W, cell * len(NAMING)), "white")
    dr = ImageDraw.Draw(sheet)
    chk = Image.new("RGB", (cell, cell), (200, 200, 200))
    for yy in range(0, cell, 12):
        for xx in range(0, cell, 12):
            if (xx // 12 + yy // 12) % 2: chk.paste((240, 240, 240), (xx, yy, xx + 12, yy + 12))
    def tile(a):
        im = Image.fromarray(a, "RGBA").resize((cell, cell), Image.LANCZOS)
        bg = chk.copy(); bg.paste(im, (0, 0), im); return bg
    for r, name in enumerate(NAMING):
        dr.text((4, r * cell + 40), name, fill="black")
        tiles = [X8[naming_idx[r]].transpose(1, 2, 0)] + [y[r * seeds + k] for k in range(seeds)]
        for c_, a in enumerate(tiles):
            sheet.paste(tile(a), (200 + c_ * cell, r * cell))
    sheet.save(f"/tmp/exp2/{cfg['name']}.png")
    # the blind sheet: seed 0 of each naming tile, in naming_sheet() order, numbered
    tiles = naming_sheet()
    blind = Image.new("RGB", (6 * cell, 4 * (cell + 16)), "white"); dr = ImageDraw.Draw(blind)
    for k, t in enumerate(tiles):
        r = NAMING.index(t["answer"])
        x0, y0 = (k % 6) * cell, (k // 6) * (cell + 16)
        dr.text((x0 + 4, y0 + 2), str(t["tile"]), fill="black")
        blind.paste(tile(y[r * seeds]), (x0, y0 + 16))
    blind.save(f"/tmp/exp2/{cfg['name']}-blind.png")
    print("saved", cfg["name"])

if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
