"""The loss of one micro-batch of the latent diffusion UNet (noise, forward, loss), and the plain engine.

`micro_batch_loss` is the loss the training loop (`loop.py`) takes the backward
and the optimizer step of, inside the Ray Train workers (a DeepSpeed engine) and
in a single plain process (`loop.one_process` over a `PlainEngine` around a bare
module: `emoji-ldm train-step-check`, the GPU checks). It knows nothing of
ranks; the caller places tensors on its device once.

Nothing here waits for the GPU: no `.item()`, `float(tensor)` or boolean-mask
indexing (each is a host-device sync that stalls the CPU until every queued
kernel has run); losses and gradient norms stay device tensors, read by the
loop at its log steps only. fp16's loss scaling is the exception: it reads
its overflow flag every step (GradScaler and DeepSpeed alike).
"""

from __future__ import annotations

import torch

from emoji_ldm.models.objective import diffusion_target


def sample_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    """Gaussian noise for the forward process, with diffusers' `--noise_offset`.

    The offset adds one extra draw per image and channel, shared by all pixels, so the model also learns to
    shift an image's mean brightness (Guttenberg, "Diffusion with offset noise"): (B, C, h, w).
    """
    eps = torch.randn_like(latents)
    if noise_offset:
        eps = eps + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    return eps


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, noise_scheduler,
                   prediction_type: str, snr_gamma: float | None) -> torch.Tensor:
    """MSE of the prediction, per image weighted by min-SNR-gamma when `snr_gamma` is set.

    The weighting of diffusers' `train_text_to_image.py` (Hang et al., "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"): w(t) = min(SNR(t), gamma) / SNR(t) for epsilon prediction,
    min(SNR(t), gamma) / (SNR(t) + 1) for v-prediction and min(SNR(t), gamma) for the clean sample, where
    SNR(t) = alpha_bar_t / (1 - alpha_bar_t).
    """
    if not snr_gamma:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, t)  # (B,)
    weight = torch.clamp(snr, max=snr_gamma)
    weight = {"epsilon": weight / snr, "v_prediction": weight / (snr + 1), "sample": weight}[prediction_type]
    per_image = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    per_image = per_image.mean(dim=list(range(1, per_image.ndim)))  # (B,)
    return (per_image * weight).mean()


def sample_timesteps(recipe, num_train_timesteps: int, n: int, device) -> torch.Tensor:
    """(n,) int64 timesteps on `device`: uniform; stratified (uniform, one in each of n equal strata, drawn on the
    CPU); or logit-normal as SD3 samples them (diffusers' `compute_density_for_timestep_sampling`, on the CPU), per
    the preset's `TrainSpec.timesteps`."""
    if recipe.timesteps == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), device=device)
    if recipe.timesteps == "stratified":
        u = (torch.rand(()) + torch.arange(n) / n) % 1.0  # (n,) in [0, 1): one offset, then evenly spaced
        u = u[torch.randperm(n)]  # (n,) no link between an image's place in the batch and its timestep
    else:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling("logit_normal", n, recipe.timestep_logit_mean,
                                                  recipe.timestep_logit_std)  # (n,) in (0, 1)
    return (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1).to(device)


def micro_batch_loss(engine, noise_scheduler, latents: torch.Tensor, text: torch.Tensor, empty: torch.Tensor,
                     recipe, prediction_type: str, dtype: torch.dtype) -> torch.Tensor:
    """The loss of one micro-batch on the engine's device: caption form, caption dropout, noise, forward.

    latents (B, C, h, w) and text (B, L, D), or (B, K, L, D) for K forms of each caption (the latent table's
    `text_emb`: the caption, then its name form), float32 on the device; `empty` (L, D) is the empty caption's
    embedding; `recipe` is the preset's `TrainSpec` (caption_dropout, noise_offset, snr_gamma). `engine` is a
    DeepSpeed engine or a `PlainEngine`, called like the UNet.
    """
    if text.ndim == 4:  # one form per image, uniformly, on the CPU generator: the same draws on any device
        form = torch.randint(text.shape[1], (len(text),)).to(text.device, non_blocking=True)  # (B,)
        text = text[torch.arange(len(text), device=text.device), form]  # (B, L, D)
    drop = torch.rand(len(latents)) < recipe.caption_dropout  # on the CPU generator: the same draws on any device
    drop = drop.to(text.device, non_blocking=True).view(-1, 1, 1)  # (B, 1, 1)
    cond = torch.where(drop, empty, text)  # (B, L, D) classifier-free guidance: learn the unconditional too
    eps = sample_noise(latents, recipe.noise_offset)
    t = sample_timesteps(recipe, noise_scheduler.config.num_train_timesteps, len(latents), latents.device)
    noisy = noise_scheduler.add_noise(latents, eps, t)  # (B, C, h, w)
    pred = engine(noisy.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
    target = diffusion_target(noise_scheduler, latents, eps, t, prediction_type)
    return diffusion_loss(pred, target, t, noise_scheduler, prediction_type, recipe.snr_gamma)


def latent_forward(engine, noise_scheduler, empty: torch.Tensor, recipe, prediction_type: str,
                   dtype: torch.dtype = torch.float32):
    """The loop's `forward` (`loop.Recipe.forward`) for a micro-batch (latents (B, C, h, w), text (B, [K,] L, D))
    already on the engine's device: `micro_batch_loss`, and no logged parts."""
    def forward(micro) -> tuple:
        latents, text = micro
        return micro_batch_loss(engine, noise_scheduler, latents, text, empty, recipe, prediction_type, dtype), {}

    return forward


def grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm of the last step (before clipping), when the engine measured it: a tensor on the
    engine's device (reading it waits for the step to finish)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(norm).detach()


def to_device(array, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A host batch (a numpy array, float16 in the latent table, or a CPU tensor) as float32 on `device`, without
    waiting for the device: on a GPU through pinned memory and an asynchronous copy (a plain `.to(device)`
    synchronises the stream on every call), then cast there."""
    t = array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device, torch.float32, memory_format=memory_format)


class PlainEngine:
    """The part of a DeepSpeed engine's interface that the loop (its step and checkpoints) uses, around a bare
    module: the loop runs in one process on it (`loop.one_process`, or a recipe with a `checkpoint.FolderStorage`)."""

    def __init__(self, module, optimizer, lr_scheduler, grad_clip: float, params, scaler=None):
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.grad_clip, self.params = grad_clip, list(params)
        self.scaler = scaler  # a torch.amp.GradScaler for fp16: dynamic loss scaling
        self.last_grad_norm = None
        self.applied = True

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def get_global_grad_norm(self) -> torch.Tensor | None:
        return self.last_grad_norm

    def was_step_applied(self) -> bool:
        """False after a step the GradScaler skipped (overflowed gradients), as DeepSpeed's engine reports it."""
        return self.applied

    def save_checkpoint(self, folder: str, tag: str, client_state: dict) -> None:
        """DeepSpeed's `save_checkpoint` for one process: the module, optimizer, LR schedule (and loss scale)."""
        from pathlib import Path

        path = Path(folder) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict(), "client": dict(client_state),
                    "scaler": self.scaler.state_dict() if self.scaler else None}, path / "engine.pt")

    def load_checkpoint(self, folder: str, tag: str, load_lr_scheduler_states: bool = True) -> tuple[str, dict]:
        """DeepSpeed's `load_checkpoint`: (the path, the client state saved with it)."""
        from pathlib import Path

        path = Path(folder) / tag / "engine.pt"
        state = torch.load(path, weights_only=True, map_location="cpu")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        return str(path), state["client"]

    def step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # the norm before clipping, as DeepSpeed reports it (inf: no clipping); a device tensor, not read here
        self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf")).detach()
        self.applied = True
        if self.scaler:  # skips the step when the gradients overflowed, and lowers the scale
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.applied = self.scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        if self.applied:  # DeepSpeed does not advance the LR schedule on a skipped step either
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
