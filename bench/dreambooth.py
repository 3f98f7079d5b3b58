"""DreamBooth benchmarks, ours vs the plain way, same machine, same run:

1. Class-image generation: `dreambooth`'s Ray Data step (`class_images`: model actors, batched pipeline calls,
   one Delta commit) vs a plain loop over the same pipeline (one process, the same batch size), same model,
   same count, same steps. Prints images/s and the ratio.
2. The training step of `--method lora` vs `--method full` (UNet + text encoder trained, prior preservation
   on: a batch of instance and class images), each in its own process on the same model: ms/step and the
   process's peak memory (max RSS), and the ratios.

The model is `make demo`'s (demo-out/run, the tiny preset) when present, else a tiny SD 1.x-layout stand-in.

    python bench/dreambooth.py [--model demo-out/run] [--images 256] [--steps 25] [--train-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

from common import REPO, row, run_timed, timed, write_record

sys.path.insert(0, str(REPO))


def plain_loop(model: str, count: int, steps: int, batch: int) -> float:
    """images/s of the pipeline called in a loop, `batch` images per call; the clock starts before the model
    is loaded, as ours starts before its actors load it (the imports are done before either clock)."""
    import diffusers  # noqa: F401  (imported outside the clock)

    from emoji_ldm.inference.sampler import SampleJob, Sampler

    def draw() -> None:
        sampler = Sampler.load(model)
        for first in range(0, count, batch):
            seeds = tuple(range(first, min(count, first + batch)))
            sampler.pngs([SampleJob(("a cat emoji",) * len(seeds), seeds, "", steps, 5.0)])
    return count / timed(draw)[0]


def ours(model: str, count: int, steps: int, batch: int, actors: int, work: Path) -> float:
    """images/s of dreambooth's class-image step (Ray started before the clock, as in a RayJob)."""
    from emoji_ldm.inference.sampler import model_card, model_uri
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.train.dreambooth import DreamBoothConfig, class_images

    ensure_ray()
    base = model_uri(model)
    config = DreamBoothConfig(base=base, instance_data="dir:/unused", instance_prompt="a sks cat emoji",
                              class_prompt="a cat emoji", out=str(work / "db"), num_class_images=count,
                              class_steps=steps, class_batch=batch, class_actors=actors)
    seconds, (_, _, made) = timed(lambda: class_images(config, base, model_card(base).get("content_id", "bench"),
                                                       str(work / "classes")))
    assert made == count
    return count / seconds


def train_step(model: str, method: str, steps: int, batch: int) -> dict:
    """ms/step of one DreamBooth step (a plain engine, no Ray) and this process's peak RSS."""
    import torch
    from diffusers import DDPMScheduler

    from emoji_ldm.inference.sampler import model_folder
    from emoji_ldm.models.builders import load_sd_pipeline
    from emoji_ldm.train.dreambooth import DreamBoothConfig, _module, configure, prior_preservation_loss
    from emoji_ldm.train.loop import one_process
    from emoji_ldm.train.step import PlainEngine, diffusion_target

    torch.manual_seed(0)
    torch.set_num_threads(2)
    pipe = load_sd_pipeline(model_folder(model))
    config = DreamBoothConfig(base=model, instance_data="dir:/unused", instance_prompt="a sks cat emoji",
                              class_prompt="a cat emoji", out="/unused", method=method, train_text_encoder=True)
    params = configure(pipe, config)
    module = _module(pipe.unet, pipe.text_encoder, bool(getattr(pipe.text_encoder.config, "use_attention_mask", 0)))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    engine = PlainEngine(module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), 1.0, params)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size
    tokens = pipe.tokenizer(["a sks cat emoji"] * batch + ["a cat emoji"] * batch, padding="max_length",
                            max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    latents = torch.randn(2 * batch, pipe.unet.config.in_channels, size, size)  # (2B, C, h, w)

    def forward(micro):
        eps = torch.randn_like(micro)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(micro),))
        pred = engine(noise.add_noise(micro, eps, t), t, tokens.input_ids, tokens.attention_mask)
        loss, _, _ = prior_preservation_loss(pred, diffusion_target(noise, micro, eps, t, "epsilon"), batch, 1.0)
        return loss, {}

    loop = one_process(engine, params, forward, micro=2 * batch, device="cpu")

    def step():
        loop.step(latents)  # the training loop's step

    step()
    seconds, _ = timed(lambda: [step() for _ in range(steps)])
    return {"method": method, "ms_per_step": seconds / steps * 1000,
            "trainable_m": sum(p.numel() for p in params) / 1e6,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-out/run")
    parser.add_argument("--images", type=int, default=256, help="class images per side")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps per class image")
    parser.add_argument("--batch", type=int, default=8, help="class images per pipeline call (both sides)")
    parser.add_argument("--actors", type=int, default=os.cpu_count(), help="our model actors (one CPU each)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--train-batch", type=int, default=4, help="instance images per step (+ as many class)")
    parser.add_argument("--step-only", default=None, help=argparse.SUPPRESS)  # a child: one method's step
    args = parser.parse_args()

    if args.step_only:
        print(json.dumps(train_step(args.model, args.step_only, args.train_steps, args.train_batch)))
        return
    model = args.model
    work = Path(tempfile.mkdtemp(prefix="bench-dreambooth-"))
    if not (REPO / model).exists() and not Path(model).exists():
        from tests.tiny_models import tiny_model_with_card

        model = str(tiny_model_with_card(work / "stand-in"))
        print(f"no {args.model}: using a tiny SD stand-in", flush=True)
    print(f"bench/dreambooth.py: model {model}, {os.cpu_count()} CPUs", flush=True)

    loop = plain_loop(model, args.images, args.steps, args.batch)
    print(f"class images, plain loop:   {loop:6.1f} images/s ({args.images} images, {args.steps} steps, "
          f"batch {args.batch})", flush=True)
    ray_data = ours(model, args.images, args.steps, args.batch, args.actors, work)
    print(f"class images, ours (Ray Data, {args.actors} actors): {ray_data:6.1f} images/s -> "
          f"{ray_data / loop:.2f}x the loop", flush=True)

    rows = {}
    for method in ("full", "lora"):
        _, r = run_timed([sys.executable, __file__, "--model", model, "--step-only", method, "--train-steps",
                          str(args.train_steps), "--train-batch", str(args.train_batch)], cwd=REPO)
        rows[method] = json.loads(r.stdout.strip().splitlines()[-1])
        step = rows[method]
        print(f"train step {method:4s}: {step['ms_per_step']:7.1f} ms/step, {step['trainable_m']:.2f}M trainable, "
              f"peak RSS {step['peak_rss_mib']:.0f} MiB", flush=True)
    full, lora = rows["full"], rows["lora"]
    print(f"lora vs full: step time {lora['ms_per_step'] / full['ms_per_step']:.2f}x, peak memory "
          f"{lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}x, trainable params "
          f"{lora['trainable_m'] / full['trainable_m']:.3f}x", flush=True)
    write_record("dreambooth", {"config": vars(args), "plain_images_per_s": loop, "ours_images_per_s": ray_data,
                                "train_step": rows}, [
        row("dreambooth", f"class images/s: Ray Data ({args.actors} model actors, one Delta commit) vs a plain loop",
            ray_data, loop, "images/s"),
        *(row("dreambooth", f"{what}: LoRA (rank 4) vs full", lora[key], full[key], unit) for what, key, unit in (
            ("ms per training step", "ms_per_step", "ms"), ("peak RSS of the step's process", "peak_rss_mib", "MiB")))],
        about=f"class images through Ray Data vs a plain pipeline loop; the LoRA step vs the full one; on {model}.")


if __name__ == "__main__":
    main()
