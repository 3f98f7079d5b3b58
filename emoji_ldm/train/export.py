"""Export: EMA weights -> a standard diffusers StableDiffusionPipeline folder + model_card.json."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path


def assemble_pipeline(unet, preset, vae_uri: str):
    """A StableDiffusionPipeline around `unet` with the preset's VAE, text encoder and a DPM++ sampler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from emoji_ldm.models.builders import build_vae, load_text_encoder, noise_scheduler
    from emoji_ldm.store.artifacts import local_copy
    from emoji_ldm.store.uri import normalize_uri

    local_vae = None
    if preset.vae.trained_here or (vae_uri and vae_uri != preset.vae.pretrained):
        local_vae = local_copy(normalize_uri(vae_uri))
    vae = build_vae(preset, local_vae).eval()
    tokenizer, text_encoder = load_text_encoder(preset)
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler(preset).config, algorithm_type="dpmsolver++")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT where CLIP is annotated: a type warning only
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ema_unet(checkpoint_uri: str, preset):
    """The UNet with the checkpoint's EMA weights (LoRA adapters fused into the base weights).

    Reads only `ema.pt` of the checkpoint (local or S3), not the optimizer shards beside it.
    """
    import io

    from emoji_ldm.models.builders import build_unet, configure_trainable
    from emoji_ldm.store.artifacts import artifact_uri, read_bytes
    from emoji_ldm.train.checkpoint import load_tensors
    from emoji_ldm.train.ema import make_ema

    unet = build_unet(preset)
    params = configure_trainable(unet, preset)
    ema = make_ema(params, preset.train)
    ema.load_state_dict(load_tensors(io.BytesIO(read_bytes(artifact_uri(checkpoint_uri, "ema.pt")))))
    ema.copy_to(params)
    if preset.unet.finetune == "lora":
        unet.fuse_lora()
        unet.unload_lora()
    unet.requires_grad_(False)
    return unet.float()


def export_model(checkpoint_uri: str, preset, vae_uri: str, out_uri: str, card: dict) -> dict:
    """Write the pipeline folder and its card to `out_uri` (card last: readers look for it); returns the card,
    with the weights' `content_id` (computed here, once, from the files just saved)."""
    from emoji_ldm.store.artifacts import upload_dir, weights_content_id

    unet = ema_unet(checkpoint_uri, preset)
    pipe = assemble_pipeline(unet, preset, vae_uri)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        card = {**card, "content_id": weights_content_id(tmp)}
        (Path(tmp) / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        upload_dir(tmp, out_uri)
    print(f"[train] exported the EMA model to {out_uri} ({card['content_id']})", flush=True)
    return card
