"""DreamBooth: personalise a model on a handful of photos of one subject, with prior preservation.

    emoji-ldm dreambooth --base MODEL --instance-data dir:PHOTOS --instance-prompt "a sks cat emoji"
                         --class-prompt "a cat emoji" --out URI [--method full|lora] [--lora-rank 4]
                         [--num-class-images 100] [--prior-loss-weight 1.0] [--train-text-encoder]
                         [--max-steps 400] [--lr LR] [--workers 2] [--resume] [--gpu]

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
   loss of diffusers' `train_dreambooth.py`: MSE(instance) + prior_loss_weight x MSE(class). Checkpoints
   under `OUT/checkpoints`, `--resume` continues.
4. Export: `OUT/model`, a full pipeline folder (LoRA fused) that `generate`, `serve` and `bulk` load like
   any model; with `--method lora` also `OUT/lora/pytorch_lora_weights.safetensors` (diffusers/peft
   format, `pipe.load_lora_weights(OUT/lora)`, servable as an adapter on the base). The model card
   records the base, the prompts and the content hash of every instance photo.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from emoji_ldm.errors import UserError
from emoji_ldm.options import opt
from emoji_ldm.train.speed import SpeedOptions

logger = logging.getLogger(__name__)

METHODS = ("full", "lora")
MIN_INSTANCE, MAX_INSTANCE = 3, 1000
MAX_CLASS_IMAGES = 1000  # each worker holds the class images' PNG bytes in memory
MAX_LORA_RANK = 256

CLASS_SCHEMA = pa.schema([
    ("id", pa.string()),            # sha256 of the PNG
    ("image", pa.binary()),         # RGB PNG at the base model's resolution, with its generation parameters
    ("prompt", pa.string()),        # the class prompt
    ("seed", pa.int64()),
    ("base", pa.string()),          # the base model's content id: rows are reused only for the same weights
    ("base_uri", pa.string()),
    ("steps", pa.int32()),
    ("guidance", pa.float32()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])


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
    use_gpu: bool = opt(False, flag="gpu", help="use GPUs (nccl, bf16); default CPU (gloo, fp32)")
    speed: SpeedOptions = opt(default_factory=SpeedOptions, help="the GPU fast path: precision, TF32, "
                                                                 "checkpointing, channels-last, compile")
    threads_per_worker: int = opt(1, cli=False, help="torch threads per worker")

    def __post_init__(self):
        from emoji_ldm.options import check_choice

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
        if self.batch_size <= 0 or self.batch_size % self.workers:
            raise UserError(f"--batch-size {self.batch_size} must be a positive multiple of --workers "
                            f"{self.workers} (each worker takes the same number of instance images)")
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
    resume_from: str | None = None


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


def configure(pipe, config: DreamBoothConfig) -> list:
    """Freeze and unfreeze by method; returns the trainable parameters."""
    pipe.vae.requires_grad_(False)
    pipe.unet.requires_grad_(config.method == "full")
    pipe.text_encoder.requires_grad_(config.method == "full" and config.train_text_encoder)
    if config.method == "lora":
        add_lora(pipe.unet, pipe.text_encoder, config.lora_rank, config.train_text_encoder)
    return [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]


def merged_copy(model, base: str):
    """A plain copy of a transformers model with peft LoRA adapters: the adapters merged into the weights
    (peft's `merge()`), loaded into a fresh instance of the base's text encoder."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from emoji_ldm.store.artifacts import local_copy

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh = type(model).from_pretrained(local_copy(base), subfolder="text_encoder")
    fresh.load_state_dict(state)
    return fresh


def train_loop(loop_config: dict) -> None:
    from emoji_ldm.train.ldm import run_worker

    run_worker(_worker, loop_config["run"])


def _read_images(uri: str, version: int, filter_=None, limit: int | None = None) -> list[bytes]:
    """The PNG bytes of a small table (instance photos, class images): bounded by the config's limits."""
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.uri import DatasetRef

    dataset = open_table(DatasetRef(uri, version=version)).to_pyarrow_dataset()
    scanner = dataset.scanner(columns=["image"], filter=filter_)
    table = scanner.head(limit) if limit else scanner.to_table()
    return table.column("image").to_pylist()


def _worker(run: DreamBoothRun) -> None:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if run.config.use_gpu else "cpu")
    import deepspeed
    import numpy as np
    import pyarrow.compute as pc
    import ray.train
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from emoji_ldm.store.artifacts import local_copy
    from emoji_ldm.train.data import decode_images
    from emoji_ldm.train.ldm import deepspeed_config
    from emoji_ldm.train.speed import batch_layout, compile_engine, torch_dtype
    from emoji_ldm.train.step import diffusion_target, grad_norm

    config = run.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.threads_per_worker)
    torch.manual_seed(config.seed * 7919 + rank)
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    precision = config.speed.resolved_precision(config.use_gpu)
    dtype = torch_dtype(precision)
    micro = config.batch_size // world  # instance images per rank per step; as many class images

    pipe = StableDiffusionPipeline.from_pretrained(local_copy(run.base), safety_checker=None,
                                                   requires_safety_checker=False)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise.config.prediction_type
    params = configure(pipe, config)
    vae = pipe.vae.to(device).eval()
    scale = float(vae.config.scaling_factor)
    use_mask = bool(getattr(pipe.text_encoder.config, "use_attention_mask", False))
    module = _module(pipe.unet, pipe.text_encoder, use_mask)

    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(micro * (2 if run.class_uri else 1), 1, 1.0, config.zero_stage, precision),
        dist_init_required=False,
    )
    compile_engine(engine, config.speed)

    instance = _read_images(run.instance_uri, run.instance_version)
    classes = []
    if run.class_uri:
        wanted = (pc.field("base") == run.base_id) & (pc.field("prompt") == config.class_prompt)
        classes = _read_images(run.class_uri, run.class_version, wanted, config.num_class_images)
    tokens = pipe.tokenizer([config.instance_prompt, config.class_prompt], padding="max_length",
                            max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)  # (2, L): instance, class

    state = {"step": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and run.resume_from:
        checkpoint = ray.train.Checkpoint(run.resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _, client = engine.load_checkpoint(folder, tag="ds", load_lr_scheduler_states=True)
            state = {"step": client["step"]}
        if rank == 0:
            print(f"[dreambooth] resumed from {checkpoint.path} at step {state['step']}", flush=True)
    rng = np.random.default_rng([config.seed, rank, state["step"]])  # batches go on where they stopped

    if rank == 0:
        trainable = sum(p.numel() for p in params)
        print(f"[dreambooth] {config.method} on {run.base} ({run.base_id[:19]}): {world} workers, ZeRO stage "
              f"{config.zero_stage}, {len(instance)} instance photos x {config.instance_prompt!r}, "
              f"{len(classes)} class images x {config.class_prompt!r} (prior weight {config.prior_loss_weight}), "
              f"{trainable / 1e6:.2f}M trainable params, text encoder "
              f"{'trained' if config.train_text_encoder else 'frozen'}, lr {config.learning_rate:g}, "
              f"steps {state['step']}->{config.max_steps}; {config.speed.summary(config.use_gpu)}", flush=True)
    log = _Log(run) if rank == 0 else None
    sums, t0 = np.zeros(3), time.perf_counter()
    while state["step"] < config.max_steps:
        pngs = [instance[i] for i in rng.integers(0, len(instance), micro)]
        if classes:
            pngs += [classes[i] for i in rng.integers(0, len(classes), micro)]
        pixels = torch.from_numpy(decode_images({"image": pngs}, run.image_size)["pixels"]).to(device, torch.float32)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * scale  # (B, C, h, w): instance rows, then class
        latents = latents.contiguous(memory_format=batch_layout(config.speed))
        rows = torch.tensor([0] * micro + [1] * (len(pngs) - micro), device=device)
        eps = torch.randn_like(latents)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(latents),), device=device)
        noisy = noise.add_noise(latents, eps, t)
        pred = engine(noisy.to(dtype), t, ids[rows], mask[rows])
        target = diffusion_target(noise, latents, eps, t, prediction_type)
        loss, inst, prior = prior_preservation_loss(pred, target, micro, config.prior_loss_weight)
        engine.backward(loss)
        engine.step()
        state["step"] += 1
        step = state["step"]
        sums += [float(loss), float(inst), float(prior)]
        if step % config.log_every == 0 or step == config.max_steps:
            mean = torch.tensor(sums, device=device)
            torch.distributed.all_reduce(mean)
            n = config.log_every if step % config.log_every == 0 else step % config.log_every
            seconds = (time.perf_counter() - t0) / n
            if log:
                log.step(step, *(mean / world / n).tolist(), scheduler.get_last_lr()[0], seconds,
                         grad_norm(engine))
            sums, t0 = np.zeros(3), time.perf_counter()
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            _checkpoint(engine, state, run, rank, world, log)
    _export(engine, pipe, run, rank, log)


def _checkpoint(engine, state, run: DreamBoothRun, rank: int, world: int, log) -> None:
    import shutil

    import ray.train

    folder = tempfile.mkdtemp(prefix="emoji-ldm-db-ckpt-")
    engine.save_checkpoint(folder, tag="ds", client_state=dict(state))
    if rank == 0:
        meta = {**state, "world_size": world, "zero_stage": run.config.zero_stage, "method": run.config.method,
                "base": run.base_id, "train_text_encoder": run.config.train_text_encoder,
                "lora_rank": run.config.lora_rank}
        (Path(folder) / "state.json").write_text(json.dumps(meta, indent=2))
        if log:
            log.flush()
    ray.train.report({"step": state["step"], "loss": log.last_loss if log else None},
                     checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_dir_name=f"step-{state['step']:08d}")
    shutil.rmtree(folder, ignore_errors=True)


def _export(engine, pipe, run: DreamBoothRun, rank: int, log) -> None:
    """Rank 0 writes OUT/lora (LoRA) and OUT/model (the full pipeline, LoRA fused), card last."""
    import deepspeed
    import torch

    from emoji_ldm.store.artifacts import artifact_uri, upload_dir, weights_content_id

    zero3 = run.config.zero_stage == 3
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero3):
        if rank != 0:
            return
        unet, text_encoder = engine.module.unet, engine.module.text_encoder
        unet.to(torch.float32), text_encoder.to(torch.float32)
        card = dict(run.card)
        if run.config.method == "lora":
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            text_layers = None
            if run.config.train_text_encoder:
                text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
            with tempfile.TemporaryDirectory() as tmp:
                StableDiffusionPipeline.save_lora_weights(
                    tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                    text_encoder_lora_layers=text_layers, safe_serialization=True)
                lora_card = {**card, "kind": "emoji-ldm lora", "content_id": weights_content_id(tmp)}
                (Path(tmp) / "model_card.json").write_text(json.dumps(lora_card, indent=2, sort_keys=True))
                upload_dir(tmp, artifact_uri(run.out, "lora"), last=("model_card.json",))
            card["lora"] = {"uri": artifact_uri(run.out, "lora"), "content_id": lora_card["content_id"]}
            unet.fuse_lora()
            unet.unload_lora()
            if run.config.train_text_encoder:
                text_encoder = merged_copy(text_encoder, run.base)
        pipe.unet, pipe.text_encoder = unet.eval(), text_encoder.eval()
        with tempfile.TemporaryDirectory() as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            card["content_id"] = weights_content_id(tmp)
            (Path(tmp) / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
            upload_dir(tmp, artifact_uri(run.out, "model"))
        if log:
            log.flush()
        print(f"[dreambooth] exported {artifact_uri(run.out, 'model')} ({card['content_id']})", flush=True)


class _Log:
    """Rank 0's metrics.jsonl, loss.png and TensorBoard scalars (loss, instance and prior loss, lr)."""

    def __init__(self, run: DreamBoothRun):
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.local = Path(tempfile.mkdtemp(prefix="emoji-ldm-db-"))
        self.rows: list[dict] = []
        self.last_loss = None
        self.tb = SummaryWriter(str(self.local / "tensorboard"))

    def step(self, step, loss, instance, prior, lr, seconds, norm) -> None:
        self.last_loss = loss
        row = {"step": step, "loss": loss, "instance_loss": instance, "prior_loss": prior, "lr": lr,
               "step_time_s": seconds, "grad_norm": norm, "time": time.time()}
        for name in ("loss", "instance_loss", "prior_loss", "lr", "grad_norm"):
            if row[name] is not None:
                self.tb.add_scalar(f"train/{name}", row[name], step)
        self.rows.append(row)
        print(f"[dreambooth] step {step}/{self.run.config.max_steps} loss {loss:.4f} (instance {instance:.4f}, "
              f"prior {prior:.4f}) lr {lr:.2e} {seconds * 1000:.0f} ms/step", flush=True)

    def flush(self) -> None:
        from emoji_ldm.store.artifacts import artifact_uri, exists, read_bytes, upload_dir, write_bytes
        from emoji_ldm.train.ldm import loss_curve_png

        uri = artifact_uri(self.run.out, "metrics.jsonl")
        if not self.rows:
            return
        if self.run.resume_from and exists(uri) and not getattr(self, "_merged", False):
            first = self.rows[0]["step"]
            old = [json.loads(line) for line in read_bytes(uri).decode().splitlines() if line.strip()]
            self.rows = [r for r in old if r["step"] < first] + self.rows
            self._merged = True
        write_bytes(uri, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        write_bytes(artifact_uri(self.run.out, "loss.png"), loss_curve_png(self.rows))
        self.tb.flush()
        upload_dir(self.local / "tensorboard", artifact_uri(self.run.out, "tensorboard"))


# --- the driver ---------------------------------------------------------------------


def pipeline_image_size(base: str) -> int:
    """The base pipeline's resolution in pixels, from its configs alone (unet sample_size x the VAE's factor)."""
    from emoji_ldm.store.artifacts import read_json
    from emoji_ldm.store.uri import join

    try:
        unet = read_json(join(base, "unet", "config.json"))
        vae = read_json(join(base, "vae", "config.json"))
    except (UserError, OSError, ValueError) as e:
        raise UserError(f"--base {base!r} is not a Stable Diffusion pipeline folder (unet/ and vae/ configs): "
                        f"{e}") from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _instance_table(config: DreamBoothConfig, out: str, size: int) -> tuple[str, int, list[dict]]:
    """Step 1: the photos as a dataset version at OUT/instance; (uri, version, [{id, source_url}] of its rows).

    Builds with a limit of one more than the maximum, so a huge folder is never ingested in full; a count out
    of range removes a table this run created, so nothing is left half-written."""
    from emoji_ldm.ingest.build import BuildConfig, build_dataset
    from emoji_ldm.ingest.images import ImageConfig
    from emoji_ldm.store.delta import open_table, table_exists
    from emoji_ldm.store.uri import filesystem, join

    uri = join(out, "instance")
    created = not table_exists(uri)
    summary = build_dataset(BuildConfig(source=config.instance_data, out=uri, image=ImageConfig(size=size),
                                        limit=MAX_INSTANCE + 1, message="dreambooth instance photos"))
    print(f"[dreambooth] instance photos: {summary.line()}", flush=True)
    table = open_table(uri)
    rows = table.to_pyarrow_dataset().to_table(columns=["id", "source_url"])  # at most MAX_INSTANCE + 1 rows
    if not MIN_INSTANCE <= rows.num_rows <= MAX_INSTANCE:
        if created:
            fs, path = filesystem(uri)
            fs.delete_dir(path)
        raise UserError(f"--instance-data {config.instance_data!r} gave {rows.num_rows}"
                        f"{'+' if rows.num_rows > MAX_INSTANCE else ''} usable photos: DreamBooth takes "
                        f"{MIN_INSTANCE} to {MAX_INSTANCE} (10-20 is typical)")
    return uri, table.version(), rows.to_pylist()


class ClassImageSampler:
    """A Ray Data actor: the base pipeline, once per actor; a batch of seeds in, class-image rows out."""

    def __init__(self, base: str, base_id: str, prompt: str, steps: int, guidance: float, device: str):
        from emoji_ldm.inference.sampler import Sampler

        self.sampler = Sampler.load(base, device=device)
        self.base, self.base_id, self.prompt, self.steps, self.guidance = base, base_id, prompt, steps, guidance

    def __call__(self, batch: dict) -> pa.Table:
        import datetime as dt
        import hashlib

        from emoji_ldm.inference.sampler import SampleJob

        seeds = tuple(int(s) for s in batch["seed"])
        job = SampleJob((self.prompt,) * len(seeds), seeds, "", self.steps, self.guidance)
        now = dt.datetime.now(dt.timezone.utc)
        rows = [{"id": hashlib.sha256(png).hexdigest(), "image": png, "prompt": self.prompt, "seed": seed,
                 "base": self.base_id, "base_uri": self.base, "steps": self.steps, "guidance": self.guidance,
                 "created_at": now}
                for seed, (png, _) in zip(seeds, self.sampler.pngs([job])[0])]
        return pa.Table.from_pylist(rows, schema=CLASS_SCHEMA)


def class_images(config: DreamBoothConfig, base: str, base_id: str, uri: str) -> tuple[int, int, int]:
    """Step 2: make the class table hold `num_class_images` rows of this base and class prompt.

    Counts the rows it has (an expression filter; no rows read), draws only the missing ones in Ray Data
    actors and commits them as one new version. Returns (version, reused, generated)."""
    import numpy as np
    import pyarrow.compute as pc
    import ray.data

    from emoji_ldm.store.delta import CommitDeltaDatasink, open_table, table_exists
    from emoji_ldm.version import code_version

    wanted = (pc.field("base") == base_id) & (pc.field("prompt") == config.class_prompt)
    have = open_table(uri).to_pyarrow_dataset().count_rows(filter=wanted) if table_exists(uri) else 0
    missing = max(0, config.num_class_images - have)
    if missing:
        print(f"[dreambooth] class images: {have} of {config.num_class_images} for {config.class_prompt!r} in "
              f"{uri}; drawing {missing} with the base model", flush=True)
        # the seeds are in the object store (no read tasks) and the commit's write tasks take no CPU, so the
        # model actors may hold every CPU without starving the pipeline around them
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        actors = min(config.class_actors, cpus)
        if actors < config.class_actors:
            print(f"[dreambooth] --class-actors {config.class_actors} lowered to {actors}: the cluster has "
                  f"{cpus} CPUs", flush=True)
        first = config.seed + have  # new seeds: a re-run after a partial generation draws different images
        wanted_seeds = np.arange(first, first + missing, dtype=np.int64)  # (missing,): the work asked, not a table
        seeds = ray.data.from_numpy([wanted_seeds[i:i + config.class_batch]  # one block per batch, over the actors
                                     for i in range(0, missing, config.class_batch)]).rename_columns({"data": "seed"})
        rows = seeds.map_batches(
            ClassImageSampler,
            fn_constructor_kwargs={"base": base, "base_id": base_id, "prompt": config.class_prompt,
                                   "steps": config.class_steps, "guidance": config.class_guidance,
                                   "device": "cuda" if config.use_gpu else "cpu"},
            batch_size=config.class_batch, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if config.use_gpu else 0,
        )
        rows.write_datasink(CommitDeltaDatasink(uri, schema=CLASS_SCHEMA, metadata={
            "operation": "dreambooth-class-images", "source": base, "model_content_id": base_id,
            "counts": {"added": missing}, "code_version": code_version(),
            "message": f"{missing} class images of {config.class_prompt!r}"}), ray_remote_args={"num_cpus": 0})
    else:
        print(f"[dreambooth] class images: reusing {have} for {config.class_prompt!r} in {uri}", flush=True)
    return open_table(uri).version(), min(have, config.num_class_images), missing


def dreambooth(config: DreamBoothConfig) -> dict:
    """Personalise `config.base` on the instance photos; returns the exported model's card."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from emoji_ldm.inference.sampler import model_card, model_uri
    from emoji_ldm.runtime import ensure_ray, require_shared
    from emoji_ldm.store.artifacts import artifact_uri, check_writable, local_copy, weights_content_id, write_json
    from emoji_ldm.store.uri import filesystem, normalize_uri, storage_options
    from emoji_ldm.train.ldm import latest_checkpoint, raise_worker_error
    from emoji_ldm.version import code_version

    base = model_uri(normalize_uri(config.base))  # a clear error now for a folder without a pipeline
    size = pipeline_image_size(base)
    warning = class_word_warning(config.instance_prompt, config.class_prompt)
    if warning:
        logger.warning(warning)
    out = check_writable(config.out)
    existing = latest_checkpoint(out)
    if existing and not config.resume:
        raise UserError(f"{out!r} already has checkpoints (latest step {existing[1]['step']}): pass --resume to "
                        "continue, or choose a new --out")
    base_id = model_card(base).get("content_id") or weights_content_id(local_copy(base))
    if config.resume and existing:
        saved = existing[1]
        now = {"world_size": config.workers, "zero_stage": config.zero_stage, "method": config.method,
               "base": base_id, "train_text_encoder": config.train_text_encoder, "lora_rank": config.lora_rank}
        diffs = [k for k, v in now.items() if saved.get(k) != v]
        if diffs:
            raise UserError(f"--resume: the checkpoint under {out!r} was written with other {', '.join(diffs)} ("
                            + ", ".join(f"{k} {saved.get(k)!r}" for k in diffs) + "); resume with the same "
                            "settings, or train into a new --out")

    ensure_ray(dashboard=True)
    for uri, what in ((out, "the run folder (--out)"), (base, "the base model (--base)")):
        require_shared(uri, what)
    class_uri = normalize_uri(config.class_data) if config.class_data else artifact_uri(out, "class-images")
    instance_uri, instance_version, photos = _instance_table(config, out, size)
    class_version = reused = generated = None
    if config.prior:
        require_shared(class_uri, "the class-image table (--class-data)")
        class_version, reused, generated = class_images(config, base, base_id, class_uri)

    card = {
        "kind": "emoji-ldm dreambooth", "method": config.method, "base": base, "base_content_id": base_id,
        "instance_prompt": config.instance_prompt, "class_prompt": config.class_prompt,
        "instance_photos": [{"id": p["id"], "source": p["source_url"]} for p in photos],
        "instance_table": f"{instance_uri}@{instance_version}",
        "class_images": (f"{class_uri}@{class_version}" if config.prior else None),
        "training": {"workers": config.workers, "zero_stage": config.zero_stage, "steps": config.max_steps,
                     "batch_size": config.batch_size, "lr": config.learning_rate,
                     "prior_loss_weight": config.prior_loss_weight, "lora_rank": config.lora_rank,
                     "train_text_encoder": config.train_text_encoder},
        "code_version": code_version(),
    }
    write_json(artifact_uri(out, "config.json"), {"run": asdict(config), "base": base, "base_content_id": base_id,
                                                  "instance_table": card["instance_table"],
                                                  "class_images": card["class_images"]})
    run = DreamBoothRun(config=config, base=base, base_id=base_id, image_size=size, instance_uri=instance_uri,
                        instance_version=instance_version, class_uri=class_uri if config.prior else None,
                        class_version=class_version, out=out, card=card,
                        resume_from=existing[0] if (config.resume and existing) else None)
    fs, storage = filesystem(artifact_uri(out, "checkpoints"))
    name = time.strftime("dreambooth-%Y%m%d-%H%M%S")
    trainer = TorchTrainer(
        train_loop, train_loop_config={"run": run},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": {**storage_options(),
                                             "DS_ACCELERATOR": "cuda" if config.use_gpu else "cpu"}},
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    raise_worker_error(out)
    from emoji_ldm.store.artifacts import read_json

    card = read_json(artifact_uri(out, "model", "model_card.json"))
    return {**card, "out": out, "class_reused": reused, "class_generated": generated,
            "final_loss": result.metrics.get("loss")}


def report(card: dict) -> str:
    out = card["out"].rstrip("/")
    lora = f", LoRA {out}/lora" if card.get("lora") else ""
    classes = ("" if card.get("class_images") is None else
               f"; class images: {card['class_reused']} reused, {card['class_generated']} drawn")
    return (f"dreambooth: {card['method']} on {card['base']}, {len(card['instance_photos'])} photos, "
            f"{card['training']['steps']} steps{classes} -> model {out}/model{lora}; "
            f"generate with --prompt {card['instance_prompt']!r}")
