"""`make gpu-check`'s inference checks: encoding, captioning (Qwen2.5-VL), sampling in fp16/bf16 with and without
torch.compile, and the Generator drawing a set, each on tiny random models of the real classes."""

from __future__ import annotations

import json
import time

from gpu_check.context import Context, Skip, installed, need

# ---- encode: the frozen VAE + text encoder on a batch ------------------------------------------------------

def encode(ctx: Context) -> dict:
    need("diffusers")
    import torch

    from emoji_ldm.models.builders import build_vae, encode_text, load_text_encoder, vae_scaling_factor
    from emoji_ldm.models.presets import get_preset
    from tests.tiny_models import tiny_clip

    clip = tiny_clip(ctx.work / "clip")
    preset = get_preset("tiny", {"text.pretrained": str(clip), "text.kind": "clip", "text.hidden_size": "32"})
    tokenizer, text_model = load_text_encoder(preset)
    text_model.to(ctx.device)
    torch.manual_seed(0)
    vae = build_vae(preset).to(ctx.device).eval()  # the tiny preset's own RGBA VAE, factor 8
    n = 4 if ctx.quick else 16
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    vae.to(dtype)
    size = preset.image_size
    pixels = torch.rand(n, preset.vae.channels, size, size, device=ctx.device) * 2 - 1  # (B, C, H, W) in [-1, 1]
    start = time.perf_counter()
    with torch.no_grad():
        latents = vae.encode(pixels.to(dtype)).latent_dist.sample() * vae_scaling_factor(vae, preset)  # (B, 4, h, w)
        hidden, mask, truncated = encode_text(tokenizer, text_model, [f"emoji {i}" for i in range(n)],
                                              preset.text.max_length)
    ctx.sync()
    seconds = time.perf_counter() - start
    figures = {"batch": n, "latent_shape": list(latents.shape), "latent_dtype": str(latents.dtype),
               "latents_finite": bool(torch.isfinite(latents.float()).all()), "text_shape": list(hidden.shape),
               "text_finite": bool(torch.isfinite(hidden).all()), "seconds": seconds, "images_per_s": n / seconds}
    expected = [n, preset.vae.latent_channels, preset.latent_size, preset.latent_size]  # own VAE: 1/4 size
    if figures["latent_shape"] != expected or not figures["latents_finite"] or not figures["text_finite"]:
        raise AssertionError(f"latents {expected} and finite expected: {figures}")
    return figures


# ---- captioning: Qwen2.5-VL through transformers ----------------------------------------------------------

def caption(ctx: Context) -> dict:
    need("PIL")
    from PIL import Image

    from emoji_ldm.caption.prompt import DEFAULT_TEMPLATE
    from emoji_ldm.caption.qwen import QwenCaptioner
    from tests.tiny_models import tiny_qwen25_vl

    folder = tiny_qwen25_vl(ctx.work / "qwen25vl")
    captioner = QwenCaptioner(str(folder), DEFAULT_TEMPLATE, max_new_tokens=8 if ctx.quick else 16,
                              device=ctx.device)
    pictures = [Image.new("RGB", (72, 72), colour) for colour in ("gold", "crimson")]
    start = time.perf_counter()
    texts = captioner.generate(pictures, ["grinning face", "red heart"])
    ctx.sync()
    seconds = time.perf_counter() - start
    figures = {"images": len(texts), "captions": texts, "seconds": seconds,
               "model_dtype": str(captioner.model.dtype), "calls": captioner.calls}
    if len(texts) != 2 or not all(isinstance(t, str) for t in texts):
        raise AssertionError(f"two caption strings expected: {figures}")
    return figures


# ---- sampling: fp16 / bf16, with and without torch.compile ------------------------------------------------

def sampling(ctx: Context, dtype: str, compile: bool) -> dict:
    need("diffusers", "PIL")
    import torch

    from emoji_ldm.inference.compile import require_compiler
    from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler

    if compile:
        try:
            require_compiler(ctx.device)
        except Exception as e:
            raise Skip(f"no compiler for torch.compile here: {e}") from None
    sampler = Sampler.load(str(ctx.tiny_pipeline()), device=ctx.device,
                           options=InferenceOptions(dtype=dtype, compile=compile))
    steps = 2 if ctx.quick else 8
    n = 2 if ctx.quick else 8
    job = SampleJob(tuple(f"emoji {i}" for i in range(n)), tuple(range(n)), steps=steps)
    start = time.perf_counter()
    warmup = sampler.warm_up((n,), steps=2)  # a compiled UNet compiles here
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    images = sampler.sample([job])[0]
    ctx.sync()
    seconds = time.perf_counter() - start
    import numpy as np

    arrays = [np.asarray(im) for im in images]
    figures = {"dtype": dtype, "compile": compile, "unet_dtype": str(sampler.pipe.unet.dtype),
               "vae_dtype": str(sampler.pipe.vae.dtype), "images": len(images), "steps": steps,
               "size": list(images[0].size), "mode": images[0].mode, "warmup_s": warmup, "first_call_s": first_s,
               "seconds": seconds, "images_per_s": n / seconds,
               "distinct_images": len({a.tobytes() for a in arrays}),
               "pixel_std": float(np.mean([a[..., :3].std() for a in arrays]))}
    del sampler
    if ctx.cuda:
        torch.cuda.empty_cache()
    if len(images) != n or images[0].mode != "RGBA":
        raise AssertionError(f"{n} RGBA images expected: {figures}")
    return figures


def compiled(ctx: Context, dtype: str) -> dict:
    if not ctx.cuda and ctx.quick:
        raise Skip("--quick on the CPU: torch.compile (inductor's C++ build, a minute or more on 2 cores) is left "
                   "to the full run")
    return sampling(ctx, dtype, True)



# ---- the Generator drawing a set (its Sampler calls, without Ray Serve) ------------------------------------

def generator_set(ctx: Context) -> dict:
    need("diffusers", "PIL")
    import io
    import zipfile

    from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler
    from emoji_ldm.inference.settings import SamplerSettings
    from emoji_ldm.serve.sets import MANIFEST, SHEET, new_set_id, set_files, set_manifest, zip_bytes

    sampler = Sampler.load(str(ctx.tiny_pipeline()), device=ctx.device, options=InferenceOptions(dtype="auto"))
    theme, items = "space cats", ["rocket", "planet", "astronaut", "moon"]
    prompts = [f"{item}, {theme}, emoji" for item in items]
    seed = 42
    settings = SamplerSettings(steps=2 if ctx.quick else 8)
    job = SampleJob.of(tuple(prompts), (seed,) * len(items), settings)  # one seed: the set is one family
    start = time.perf_counter()
    made = sampler.pngs([job])[0]  # what Generator._sample_pngs returns for the set's job
    card = json.loads((ctx.tiny_pipeline() / "model_card.json").read_text())
    set_id = new_set_id()
    manifest = set_manifest(set_id, theme, items, prompts, {"seed": seed, "steps": settings.steps}, card,
                            sampler.model_uri or "")
    files = set_files(manifest, [png for png, _ in made], [params for _, params in made])
    data = zip_bytes(files, set_id)
    ctx.sync()
    seconds = time.perf_counter() - start
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    figures = {"items": len(items), "files": len(files), "zip_bytes": len(data), "zip_entries": len(names),
               "pipeline_calls": sampler.calls, "seconds": seconds, "unet_dtype": str(sampler.pipe.unet.dtype)}
    if not ({SHEET, MANIFEST} <= set(files) and len(files) == len(items) + 2 and sampler.calls == 1):
        raise AssertionError(f"a set of {len(items)} items + sheet + manifest in one pipeline call expected: "
                             f"{figures}")
    return figures


def ray_serve(ctx: Context) -> dict:
    if not installed("ray"):
        raise Skip("ray is not installed here (its cp312 wheel alone is 76 MiB, over what one call carries)")
    raise Skip("ray is importable, but `serve --gpus 1` is out of scope for this round: needs the Ray wheels, "
               "see docs/development.md")
