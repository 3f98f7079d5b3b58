"""DreamBooth's LoRA and export: peft adapters on the UNet (and text encoder), and the exported folders.

`export` writes OUT/lora (diffusers/peft format, with LoRA) and OUT/model (the full pipeline, LoRA fused).
The frozen modules stay out of the optimizer; the export reloads them from the base.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def add_lora(unet, text_encoder, rank: int, train_text_encoder: bool) -> None:
    """peft LoRA adapters as diffusers' `train_dreambooth_lora.py` adds them (rank = alpha, gaussian init)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if train_text_encoder:
        names = {n.rsplit(".", 1)[-1] for n, _ in text_encoder.named_modules()}
        targets = [t for t in ("q_proj", "k_proj", "v_proj", "out_proj", "query", "key", "value") if t in names]
        text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                            target_modules=targets))


def configure(pipe, config) -> list:
    """Freeze and unfreeze by method, apply the fast-path options (`--gradient-checkpointing`, `--allow-tf32`,
    ...) as `train` does; returns the trainable parameters."""
    from emoji_ldm.train.speed import prepare_unet

    prepare_unet(pipe.unet, config.speed, convert_weights=False)  # channels-last: runner.create_engine, after DeepSpeed
    if config.speed.gradient_checkpointing and config.train_text_encoder:
        pipe.text_encoder.gradient_checkpointing_enable()
    pipe.vae.requires_grad_(False)
    pipe.unet.requires_grad_(config.method == "full")
    pipe.text_encoder.requires_grad_(config.method == "full" and config.train_text_encoder)
    if config.method == "lora":
        add_lora(pipe.unet, pipe.text_encoder, config.lora_rank, config.train_text_encoder)
    return [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]


def text_encoder_lora_layers(text_encoder) -> dict:
    """The text encoder's LoRA weights in diffusers' format (`lora_linear_layer.down/up`), for any text encoder.

    diffusers' own conversion renames only CLIP's projections (q_proj, k_proj, v_proj, out_proj); a BERT-family
    encoder's (query, key, value) would keep peft's names, which `load_lora_weights` cannot read back."""
    from peft.utils import get_peft_model_state_dict

    return {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
            for k, v in get_peft_model_state_dict(text_encoder).items()}


def export(engine, run, rank: int, log) -> None:
    """OUT/lora (with LoRA) and OUT/model (the full pipeline, LoRA fused), card last; rank 0 writes.

    Trained weights come from the optimizer's fp32 masters (every rank sends its part, rank 0 alone holds them all
    on its CPU), frozen ones from the base folder: under bf16 DeepSpeed casts the whole engine module, and an
    export from it would write bf16-rounded copies of weights that were never trained. The LoRA is saved with its
    adapter metadata (rank, alpha, targets), which diffusers needs to load a LoRA on a BERT-family text encoder,
    and the fused model is the base with that saved LoRA loaded and fused, so the export also proves the LoRA file
    loads."""
    import torch
    from diffusers import StableDiffusionPipeline

    from emoji_ldm.models.builders import load_sd_pipeline
    from emoji_ldm.store.artifacts import artifact_uri, local_copy, upload_dir, weights_content_id
    from emoji_ldm.train.ema import rank0_masters

    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    # every rank sends its partition (a reduce under ZeRO); only rank 0 receives, and holds, the full fp32 copy
    masters = list(rank0_masters(engine, [p for _, p in trainable], rank))
    if rank != 0:
        return
    pipe = load_sd_pipeline(local_copy(run.base))  # fp32: frozen weights exact
    card = dict(run.card)
    if run.config.method == "full":
        for part in ("unet", "text_encoder"):
            state = {n.removeprefix(part + "."): m.float() for (n, _), m in zip(trainable, masters)
                     if n.startswith(part + ".")}
            if state:
                getattr(pipe, part).load_state_dict(state, strict=False)
    else:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        with torch.no_grad():
            for (_, p), m in zip(trainable, masters):
                p.data = m.to(torch.float32)  # the LoRA weights at full precision, for peft's state dict
        unet, text_encoder = engine.module.unet, engine.module.text_encoder
        lora = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
        if run.config.train_text_encoder:
            lora["text_encoder_lora_layers"] = text_encoder_lora_layers(text_encoder)
            lora["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
        with tempfile.TemporaryDirectory() as tmp:
            StableDiffusionPipeline.save_lora_weights(tmp, safe_serialization=True, **lora)
            lora_card = {**card, "kind": "emoji-ldm lora", "content_id": weights_content_id(tmp)}
            (Path(tmp) / "model_card.json").write_text(json.dumps(lora_card, indent=2, sort_keys=True))
            pipe.load_lora_weights(tmp)
            upload_dir(tmp, artifact_uri(run.out, "lora"), last=("model_card.json",))
        card["lora"] = {"uri": artifact_uri(run.out, "lora"), "content_id": lora_card["content_id"]}
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        card["content_id"] = weights_content_id(tmp)
        (Path(tmp) / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        upload_dir(tmp, artifact_uri(run.out, "model"))
    if log:
        log.flush()
        log.print(f"exported {artifact_uri(run.out, 'model')} ({card['content_id']})")
