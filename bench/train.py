"""Training and sampling benchmarks, all in one run on this machine.

  1. throughput: a plain single-process diffusers training loop with EMA (2 threads) vs
     `emoji-ldm train` (Ray Train + DeepSpeed ZeRO-2, 2 workers x 1 thread), same
     tiny UNet, same global batch; steady-state images/s (start-up excluded).
  2. precomputed latents (what `encode` gives) vs encoding images and captions
     (VAE + MiniLM) inside every training step, plain loop, same batch.
  3. model FLOP utilisation: FLOPs of one training step (torch.utils.flop_counter)
     x steps/s of the plain loop, over an sgemm peak measured now with 2 threads.
  4. sampling: the seed's sampler (100 DDPM steps, batch 1) vs `generate`'s
     (DPM-Solver++ 25 steps, batch 16) on the same model: images/s.

Needs the outputs of `make demo` (demo-out/): the dataset, latent table and model.

    python bench/train.py [--demo-out demo-out] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import REPO, row, run_timed, timed, write_record

BIN = Path(sys.executable).parent


def load_latents(uri: str, n: int):
    from deltalake import DeltaTable

    from emoji_ldm.store.latents import decode_latents, own_caption

    t = DeltaTable(uri).to_pyarrow_table(columns=["latent", "latent_shape", "text_emb", "text_shape"]).slice(0, n)
    d = decode_latents({k: t.column(k).to_pylist() for k in t.column_names})
    # both sides train on the captions themselves, (B, L, D)
    return torch.from_numpy(d["latent"]).float(), torch.from_numpy(own_caption(d["text_emb"])).float()


def plain_loop(preset, latents, text, batch: int, steps: int, encode_fn=None) -> float:
    """A single-process diffusers loop; returns steady-state images/s (first 3 steps are warm-up)."""
    from diffusers.training_utils import EMAModel

    from emoji_ldm.models.builders import build_unet, noise_scheduler

    torch.manual_seed(0)
    unet = build_unet(preset).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    ema = EMAModel(unet.parameters(), decay=0.995)  # the same recipe as ours: EMA every step
    noise = noise_scheduler(preset)

    def step():
        idx = torch.randint(0, len(latents), (batch,))
        if encode_fn is None:
            x0, cond = latents[idx], text[idx]
        else:
            x0, cond = encode_fn(idx)
        eps = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(noise.add_noise(x0, eps, t), t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    times = [timed(step)[0] for _ in range(steps + 3)][3:]
    return batch / statistics.median(times)


def step_flops(preset, latents, text, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from emoji_ldm.models.builders import build_unet

    unet = build_unet(preset).train()
    x, c = latents[:batch], text[:batch]
    t = torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=c).sample.pow(2).mean().backward()
    return counter.get_total_flops()


def sgemm_peak(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    return 2 * 2048**3 / min(timed(torch.matmul, a, b)[0] for _ in range(10))


def ours_throughput(latent_uri: str, steps: int, batch: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        cmd = [str(BIN / "emoji-ldm"), "train", "--data", latent_uri, "--out", str(out / "run"), "--workers", "2",
               "--zero-stage", "2", "--batch-size", str(batch), "--max-steps", str(steps + 3),
               "--set", "train.log_every=1", "--set", "train.sample_every=0",
               "--set", f"train.checkpoint_every={steps + 3}"]
        run_timed(cmd)
        rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(r["images_per_s"] for r in rows[3:])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", default=str(REPO / "demo-out"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    from emoji_ldm.models.builders import build_vae, encode_text, load_text_encoder, vae_scaling_factor
    from emoji_ldm.models.presets import get_preset
    from emoji_ldm.train.data import decode_images

    demo = Path(args.demo_out)
    latent_uri, model = str(demo / "latents"), str(demo / "run")
    if not (demo / "run" / "model" / "model_index.json").exists():
        sys.exit(f"run `make demo` first: no model at {demo / 'run' / 'model'}")
    from emoji_ldm.store.latents import open_latent_table

    encoded = open_latent_table(latent_uri)[2]["preset"]["name"]
    if encoded != "tiny":
        sys.exit(f"{latent_uri} holds {encoded}'s latents; this benchmark measures tiny's (its VAE's encoding "
                 "against precomputed latents): run `DEMO_PRESET=tiny make demo` first")
    preset = get_preset("tiny")
    latents, text = load_latents(latent_uri, 2048)
    results = {}

    # 1. throughput
    torch.set_num_threads(2)
    plain = plain_loop(preset, latents, text, args.batch, args.steps)
    ours = ours_throughput(latent_uri, args.steps, args.batch)
    results["throughput"] = {"plain": plain, "ours": ours, "ratio": ours / plain}
    print(f"1. throughput, batch {args.batch}: plain loop (1 process x 2 threads) {plain:.0f} images/s, "
          f"emoji-ldm train (Ray Train + ZeRO-2, 2 workers x 1 thread) {ours:.0f} images/s, ratio {ours / plain:.2f}x")

    # 2. precomputed latents vs encoding every step
    from deltalake import DeltaTable

    ds = DeltaTable(str(demo / "twemoji")).to_pyarrow_table(columns=["image", "title"]).slice(0, 2048)
    images, titles = ds.column("image").to_pylist(), ds.column("title").to_pylist()
    vae = build_vae(preset, str(demo / "latents" / "_emoji_ldm" / "vae")).eval()
    scale = vae_scaling_factor(vae, preset)
    tok, te = load_text_encoder(preset)

    def encode_fn(idx):
        with torch.no_grad():
            batch = {"image": [images[i] for i in idx]}
            px = torch.from_numpy(decode_images(batch, preset.image_size)["pixels"]).float()
            x0 = vae.encode(px).latent_dist.mean * scale
            cond, _, _ = encode_text(tok, te, [titles[i] for i in idx], preset.text.max_length)
        return x0, cond

    slow = plain_loop(preset, latents, text, args.batch, max(10, args.steps // 2), encode_fn=encode_fn)
    results["precomputed"] = {"precomputed": plain, "encode_every_step": slow, "ratio": plain / slow}
    print(f"2. precomputed latents {plain:.0f} images/s vs encoding every step {slow:.0f} images/s: "
          f"{plain / slow:.2f}x")

    # 3. MFU
    flops = step_flops(preset, latents, text, args.batch)
    peak = sgemm_peak(2)
    achieved = flops * plain / args.batch
    results["mfu"] = {"flops_per_step": flops, "achieved": achieved, "peak": peak, "mfu": achieved / peak}
    print(f"3. MFU: {flops / 1e9:.1f} GFLOP per step x {plain / args.batch:.2f} steps/s = {achieved / 1e9:.1f} "
          f"GFLOP/s over an sgemm peak of {peak / 1e9:.0f} GFLOP/s (2 threads) = {100 * achieved / peak:.1f}%")

    # 4. sampling
    from emoji_ldm.inference.sampler import load_pipeline, run_pipeline

    torch.set_num_threads(2)
    seed_pipe = load_pipeline(model, "ddpm")
    seed_rate = 4 / timed(lambda: [run_pipeline(seed_pipe, ["red heart"], steps=100, guidance=5.0, seed=i)
                                   for i in range(4)])[0]
    ours_pipe = load_pipeline(model, "dpmpp")
    run_pipeline(ours_pipe, ["red heart"] * 2, steps=2)
    ours_rate = 16 / timed(run_pipeline, ours_pipe, ["red heart"] * 16, steps=25, guidance=5.0, seed=0)[0]
    results["sampling"] = {"seed": seed_rate, "ours": ours_rate, "ratio": ours_rate / seed_rate}
    print(f"4. sampling: seed's (DDPM 100 steps, batch 1) {seed_rate:.2f} images/s, ours (DPM-Solver++ 25 steps, "
          f"batch 16) {ours_rate:.2f} images/s: {ours_rate / seed_rate:.1f}x")
    write_record("train", results, [
        row("train", "training images/s: `emoji-ldm train` (Ray Train, ZeRO-2, 2 workers) vs a plain diffusers loop",
            ours, plain, "images/s", ">= 0.95"),
        row("train", "training images/s: precomputed latents vs VAE + text encoding in every step", plain, slow,
            "images/s", ">= 1.3"),
        row("train", "model FLOP utilisation: the plain loop's GFLOP/s vs an sgemm peak", achieved / 1e9, peak / 1e9,
            "GFLOP/s"),
        row("train", "sampling images/s: `generate` (DPM-Solver++ 25 steps, batch 16) vs the seed's (DDPM 100, "
            "batch 1)", ours_rate, seed_rate, "images/s", ">= 10")], about=f"the `tiny` preset on `make demo`'s "
                 f"latents, global batch {args.batch}, steady-state steps (start-up excluded).")


if __name__ == "__main__":
    main()
