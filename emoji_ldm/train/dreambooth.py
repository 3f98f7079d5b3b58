"""DreamBooth: personalise a model on a handful of photos of one subject, with prior preservation.

    emoji-ldm dreambooth --base MODEL --instance-data dir:PHOTOS --instance-prompt "a sks cat emoji"
                         --class-prompt "a cat emoji" --out URI [--method full|lora] [--lora-rank 4]
                         [--num-class-images 100] [--prior-loss-weight 1.0] [--train-text-encoder]
                         [--max-steps 400] [--lr LR] [--batch-size 2] [--grad-accum 1] [--workers 2]
                         [--resume] [--gpu]

The base is any diffusers StableDiffusionPipeline folder or URI: a model this project trained
(`train --out`), or a Stable Diffusion 1.x pipeline (the `sd-finetune` base). Four steps, each resumable:

1. The photos become a dataset version at `OUT/instance` (`dataset build`: cleaned, padded to the base
   model's resolution, de-duplicated, bad files rejected with a reason). 3 to 1,000 must be accepted.
2. Class images: the base model draws `--num-class-images` images of the class prompt in Ray Data actors
   (batched, on GPUs with `--gpu`) into the class table (`--class-data`, default `OUT/class-images`), one
   version per generation. Rows already there for the same base (by content id) and class prompt are
   reused; only the missing ones are drawn.
3. Training: Ray Train workers drive one DeepSpeed engine over the UNet and the text encoder (trained only
   with `--train-text-encoder`) on batches of instance and class images, with the prior-preservation
   loss of diffusers' `train_dreambooth.py`: MSE(instance) + prior_loss_weight x MSE(class), in the loop
   every recipe runs in (`loop.py`: `--grad-accum`, checkpoints under `OUT/checkpoints`, `--resume`).
4. Export: `OUT/model`, a full pipeline folder (LoRA fused) that `generate`, `serve` and `bulk` load like
   any model; with `--method lora` also `OUT/lora/pytorch_lora_weights.safetensors` (diffusers/peft
   format, `pipe.load_lora_weights(OUT/lora)`, servable as an adapter on the base). The model card
   records the base, the prompts and the content hash of every instance photo.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.train import checkpoint
from emoji_ldm.train.dreambooth_data import (
    MAX_CLASS_IMAGES,
    TrainingImages,
    class_images,
    image_card,
    pipeline_image_size,
)
from emoji_ldm.train.dreambooth_lora import configure, export
from emoji_ldm.train.lr import warmup_cosine
from emoji_ldm.train.speed import SpeedOptions

logger = logging.getLogger(__name__)

METHODS = ("full", "lora")
MAX_LORA_RANK = 256

@dataclass(frozen=True)
class DreamBoothConfig:
    base: str = opt(help="the model to personalise: a model folder/URI (a `train --out`, or an SD 1.x "
                         "pipeline folder)")
    instance_data: str = opt(help="3-1000 photos of the subject: dir:PATH or urls:FILE (any format the "
                                  "ingest accepts; padded to the base model's resolution)")
    instance_prompt: str = opt(help="the prompt naming the subject: a rare token plus its class, "
                                    "e.g. 'a sks cat emoji'")
    class_prompt: str = opt(help="the prompt of its class, for prior preservation, e.g. 'a cat emoji'")
    out: str = opt(help="run output URI: instance/, class-images/, checkpoints/, model/, lora/, metrics")
    method: str = opt("full", choices=METHODS, help="full: fine-tune the UNet's weights; lora: peft LoRA "
                                                    "adapters on its attention (and the text encoder's)")
    lora_rank: int = opt(4, help=f"LoRA rank, 1-{MAX_LORA_RANK}")
    num_class_images: int = opt(100, help=f"class images for prior preservation, 0-{MAX_CLASS_IMAGES}")
    prior_loss_weight: float = opt(1.0, help="weight of the class images' loss (0: no prior preservation)")
    train_text_encoder: bool = opt(False, help="train the text encoder too (LoRA adapters with --method lora)")
    class_data: str | None = opt(None, help="the class-image table, shared between runs (default OUT/class-images)")
    max_steps: int = opt(400, help="optimizer steps")
    lr: float | None = opt(None, help="learning rate, constant after warm-up (default 5e-6 full, 1e-4 lora)")
    warmup_steps: int = opt(0, help="linear warm-up steps")
    batch_size: int = opt(2, help="instance images per step (global; as many class images ride along)")
    grad_accum: int = opt(1, help="micro-batches per step (gradient accumulation): each worker takes "
                                  "batch-size / (workers x grad-accum) instance images at a time")
    workers: int = opt(2, help="Ray Train workers")
    zero_stage: int = opt(2, help="DeepSpeed ZeRO stage: 0, 1, 2 or 3")
    checkpoint_every: int = opt(100, help="checkpoint every N steps (and at the end)")
    log_every: int = opt(10, help="log the loss every N steps")
    class_steps: int = opt(25, help="sampler steps of the class images")
    class_guidance: float = opt(5.0, help="guidance scale of the class images")
    class_batch: int = opt(8, help="class images per pipeline call")
    class_actors: int = opt(1, help="model actors drawing class images (one GPU each with --gpu)")
    seed: int = opt(0, help="seed of the noise, the batches and the class images")
    resume: bool = opt(False, help="continue from the latest checkpoint under --out")
    max_failures: int = opt(2, help="worker restarts from the last checkpoint")
    use_gpu: bool = opt(False, flag="gpu", help="use GPUs (nccl, bf16); default CPU (gloo, fp32)")
    speed: SpeedOptions = opt(default_factory=SpeedOptions, help="the GPU fast path: precision, TF32, "
                                                                 "checkpointing, channels-last, compile")
    threads_per_worker: int = opt(1, cli=False, help="torch threads per worker")

    def __post_init__(self):
        from emoji_ldm.config import check_choice

        check_choice("--method", self.method, METHODS)
        checks = [
            (1 <= self.lora_rank <= MAX_LORA_RANK, f"--lora-rank must be 1-{MAX_LORA_RANK}, got {self.lora_rank}"),
            (0 <= self.num_class_images <= MAX_CLASS_IMAGES,
             f"--num-class-images must be 0-{MAX_CLASS_IMAGES}, got {self.num_class_images}"),
            (self.prior_loss_weight >= 0, f"--prior-loss-weight must be 0 or more, got {self.prior_loss_weight}"),
            (self.max_steps > 0, f"--max-steps must be positive, got {self.max_steps}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be 0 or more, got {self.warmup_steps}"),
            (self.workers > 0, f"--workers must be positive, got {self.workers}"),
            (self.zero_stage in (0, 1, 2, 3), f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}"),
            (self.checkpoint_every > 0 and self.log_every > 0,
             f"--checkpoint-every and --log-every must be positive, got {self.checkpoint_every}, {self.log_every}"),
            (1 <= self.class_steps <= 1000, f"--class-steps must be 1-1000, got {self.class_steps}"),
            (self.class_batch > 0 and self.class_actors > 0,
             f"--class-batch and --class-actors must be positive, got {self.class_batch}, {self.class_actors}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.grad_accum <= 0:
            raise UserError(f"--grad-accum must be positive, got {self.grad_accum}")
        if self.batch_size <= 0 or self.batch_size % (self.workers * self.grad_accum):
            raise UserError(f"--batch-size {self.batch_size} must be a positive multiple of --workers x --grad-accum "
                            f"= {self.workers} x {self.grad_accum} (each worker takes the same number of instance "
                            "images in each micro-batch)")
        if not self.instance_prompt.strip() or not self.class_prompt.strip():
            raise UserError("--instance-prompt and --class-prompt must not be empty")
        if _words(self.instance_prompt) == _words(self.class_prompt):
            raise UserError(f"--class-prompt {self.class_prompt!r} equals --instance-prompt: the instance prompt "
                            "must add the subject's rare token, e.g. 'a sks cat emoji' vs 'a cat emoji'")
        if self.prior_loss_weight > 0 and self.num_class_images == 0:
            raise UserError("--num-class-images 0 leaves prior preservation with no class images: give some "
                            "(100 is usual) or pass --prior-loss-weight 0")
        self.speed.resolved_precision(self.use_gpu)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "lora" else 5e-6)

    @property
    def prior(self) -> bool:
        return self.prior_loss_weight > 0


def _words(prompt: str) -> list[str]:
    return re.findall(r"[\w'-]+", prompt.lower())


def class_word_warning(instance_prompt: str, class_prompt: str) -> str | None:
    """A warning when the instance prompt lacks the class prompt's class word (its last word that is not
    'a', 'an', 'the', 'emoji', 'photo', ...): DreamBooth binds the rare token to that class."""
    filler = {"a", "an", "the", "of", "emoji", "photo", "picture", "image", "icon", "style", "in", "on"}
    words = [w for w in _words(class_prompt) if w not in filler]
    if not words:
        return None
    if words[-1] not in _words(instance_prompt):
        return (f"the instance prompt {instance_prompt!r} does not contain the class word {words[-1]!r} of the "
                f"class prompt {class_prompt!r}: DreamBooth ties the rare token to that class (e.g. "
                f"'a sks {words[-1]} emoji')")
    return None


# --- the worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class DreamBoothRun:
    """Everything a worker needs, passed explicitly through `train_loop_config`."""

    config: DreamBoothConfig
    base: str  # the base pipeline folder URI
    base_id: str
    image_size: int
    instance_uri: str
    instance_version: int
    class_uri: str | None
    class_version: int | None
    out: str
    card: dict  # the model card's fields known on the driver (photos, prompts, base, tables)


def prior_preservation_loss(pred, target, n_instance: int, prior_weight: float):
    """diffusers' `train_dreambooth.py` loss: the first `n_instance` rows are instance images, the rest class
    images. Returns (loss, instance MSE, prior MSE); the prior MSE is 0 when there are no class rows."""
    import torch.nn.functional as F

    instance = F.mse_loss(pred[:n_instance].float(), target[:n_instance].float())
    if n_instance == len(pred):
        return instance, instance, instance.new_zeros(())
    prior = F.mse_loss(pred[n_instance:].float(), target[n_instance:].float())
    return instance + prior_weight * prior, instance, prior


def _module(unet, text_encoder, use_mask: bool):
    import torch

    class DreamBoothModel(torch.nn.Module):
        """The UNet and the text encoder in one module, so one DeepSpeed engine trains what is trainable."""

        def __init__(self):
            super().__init__()
            self.unet, self.text_encoder = unet, text_encoder

        def forward(self, noisy, t, input_ids, attention_mask):
            # noisy (B, C, h, w), t (B,), input_ids and attention_mask (B, L) -> prediction (B, C, h, w)
            hidden = self.text_encoder(input_ids, attention_mask=attention_mask if use_mask else None)[0]
            return self.unet(noisy, t, encoder_hidden_states=hidden.to(noisy.dtype)).sample

    return DreamBoothModel()


def worker(run: DreamBoothRun) -> None:
    """A Ray Train worker: DreamBooth's recipe in the loop, then the export."""
    from emoji_ldm.train import loop

    loop.run(_recipe(run))


def _recipe(run: DreamBoothRun):
    """The base's UNet and text encoder under one DeepSpeed engine, the prior-preservation loss, the export."""
    from diffusers import DDPMScheduler

    from emoji_ldm.models.builders import load_sd_pipeline
    from emoji_ldm.store.artifacts import local_copy
    from emoji_ldm.train import loop, runner

    config = run.config
    w = runner.setup_worker(config.use_gpu, config.threads_per_worker, config.seed, config.speed)
    micro = config.batch_size // (w.world * config.grad_accum)  # instance images per micro-batch; as many class
    pipe = load_sd_pipeline(local_copy(run.base))
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    params = configure(pipe, config)
    use_mask = bool(getattr(pipe.text_encoder.config, "use_attention_mask", False))
    rows = micro * (2 if run.class_uri else 1)
    warmup = config.warmup_steps
    engine, scheduler = runner.create_engine(
        _module(pipe.unet, pipe.text_encoder, use_mask), params, lr=config.learning_rate, weight_decay=1e-2,
        lr_lambda=warmup_cosine(warmup, 1, 1.0), micro=rows,
        grad_accum=config.grad_accum, grad_clip=1.0, zero_stage=config.zero_stage, worker=w, speed=config.speed)
    photos = TrainingImages(run, w, pipe, micro)

    def forward(batch):
        import torch

        from emoji_ldm.train.step import diffusion_target

        latents, ids, mask = batch  # (B, C, h, w): instance rows, then class rows; their prompts' tokens (B, L)
        eps = torch.randn_like(latents)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(latents),), device=w.device)
        pred = engine(noise.add_noise(latents, eps, t).to(w.dtype), t, ids, mask)
        target = diffusion_target(noise, latents, eps, t, noise.config.prediction_type)
        loss, instance, prior = prior_preservation_loss(pred, target, micro, config.prior_loss_weight)
        return loss, {"instance_loss": instance, "prior_loss": prior}

    describe = (f"{config.method} on {run.base} ({run.base_id[:19]}), {len(photos.instance)} instance photos x "
                f"{config.instance_prompt!r}, {len(photos.classes)} class images x {config.class_prompt!r} (prior "
                f"weight {config.prior_loss_weight}), {runner.numel(params) / 1e6:.2f}M trainable "
                f"params, text encoder {'trained' if config.train_text_encoder else 'frozen'}, lr "
                f"{config.learning_rate:g}; {config.speed.summary(config.use_gpu)}")
    return loop.Recipe(
        tag="dreambooth", out=run.out, worker=w, engine=engine, scheduler=scheduler, zero_stage=config.zero_stage,
        params=params, micro=rows, batches=photos.batches, forward=forward, describe=describe,
        schedule=loop.Schedule(config.max_steps, config.log_every, config.checkpoint_every, config.grad_accum),
        meta=_resume_settings(config, run.base_id),
        export=lambda ema, log: export(engine, run, w.rank, log),
        storage=checkpoint.RayTrainStorage(upload="async" if config.speed.async_checkpoints else "sync"))


def _resume_settings(config: DreamBoothConfig, base_id: str) -> dict:
    """What a checkpoint records and a --resume must match (beside the world size)."""
    return {"zero_stage": config.zero_stage, "method": config.method, "base": base_id,
            "train_text_encoder": config.train_text_encoder, "lora_rank": config.lora_rank}


# --- the driver ---------------------------------------------------------------------


def dreambooth(config: DreamBoothConfig, instance_table) -> dict:
    """Personalise `config.base` on the instance photos; returns the exported model's card. `instance_table`:
    (config, out, image size) -> (the photos' table URI, its version, [{id, source_url}] of its rows): the
    CLI's (cli/dreambooth.py), which builds it with the dataset stage."""
    from emoji_ldm.inference.sampler import model_card, model_uri
    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.runtime.shared import require_shared
    from emoji_ldm.store.artifacts import (
        artifact_uri,
        check_writable,
        local_copy,
        read_json,
        weights_content_id,
        write_json,
    )
    from emoji_ldm.store.uri import normalize_uri
    from emoji_ldm.train import runner

    base = model_uri(normalize_uri(config.base))  # a clear error now for a folder without a pipeline
    size = pipeline_image_size(base)
    warning = class_word_warning(config.instance_prompt, config.class_prompt)
    if warning:
        logger.warning(warning)
    out = check_writable(config.out)
    base_id = model_card(base).get("content_id") or weights_content_id(local_copy(base))
    now = {"world_size": config.workers, **_resume_settings(config, base_id)}
    runner.refuse_or_resume(out, config.resume, lambda state: runner.check_saved(state, now, out),
                            use_gpu=config.use_gpu, precision=config.speed.resolved_precision(config.use_gpu))

    ensure_ray(dashboard=True)
    for uri, what in ((out, "the run folder (--out)"), (base, "the base model (--base)")):
        require_shared(uri, what)
    class_uri = normalize_uri(config.class_data) if config.class_data else artifact_uri(out, "class-images")
    instance_uri, instance_version, photos = instance_table(config, out, size)
    class_version = reused = generated = None
    if config.prior:
        require_shared(class_uri, "the class-image table (--class-data)")
        class_version, reused, generated = class_images(config, base, base_id, class_uri)

    card = _card(config, base, base_id, photos, (instance_uri, instance_version),
                 f"{class_uri}@{class_version}" if config.prior else None)
    write_json(artifact_uri(out, "config.json"), {"run": asdict(config), "base": base, "base_content_id": base_id,
                                                  "instance_table": card["instance_table"],
                                                  "class_images": card["class_images"]})
    run = DreamBoothRun(config=config, base=base, base_id=base_id, image_size=size, instance_uri=instance_uri,
                        instance_version=instance_version, class_uri=class_uri if config.prior else None,
                        class_version=class_version, out=out, card=card)
    result = runner.fit(worker, run, name="dreambooth", out=out, workers=config.workers, use_gpu=config.use_gpu,
                        max_failures=config.max_failures)
    card = read_json(artifact_uri(out, "model", "model_card.json"))
    return {**card, "out": out, "class_reused": reused, "class_generated": generated,
            "final_loss": result.metrics.get("loss")}


def _card(config: DreamBoothConfig, base: str, base_id: str, photos: list, instance: tuple, class_table) -> dict:
    """The model card's fields known before training: the base, the prompts, the photos and the tables."""
    from emoji_ldm.version import code_version

    return {
        "kind": "emoji-ldm dreambooth", "method": config.method, "base": base, "base_content_id": base_id,
        "instance_prompt": config.instance_prompt, "class_prompt": config.class_prompt,
        "instance_photos": [{"id": p["id"], "source": p["source_url"]} for p in photos],
        "instance_table": f"{instance[0]}@{instance[1]}", "class_images": class_table,
        "training": {"workers": config.workers, "zero_stage": config.zero_stage, "steps": config.max_steps,
                     "batch_size": config.batch_size, "grad_accum": config.grad_accum, "lr": config.learning_rate,
                     "prior_loss_weight": config.prior_loss_weight, "lora_rank": config.lora_rank,
                     "train_text_encoder": config.train_text_encoder},
        "code_version": code_version(),
        "image": image_card(*instance),
    }


def report(card: dict) -> str:
    out = card["out"].rstrip("/")
    lora = f", LoRA {out}/lora" if card.get("lora") else ""
    classes = ("" if card.get("class_images") is None else
               f"; class images: {card['class_reused']} reused, {card['class_generated']} drawn")
    return (f"dreambooth: {card['method']} on {card['base']}, {len(card['instance_photos'])} photos, "
            f"{card['training']['steps']} steps{classes} -> model {out}/model{lora}; "
            f"generate with --prompt {card['instance_prompt']!r}")
