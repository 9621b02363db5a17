"""One optimizer step: batch -> latents -> noise -> forward -> loss -> backward (x gradient accumulation) -> update
(-> kohya's max-norm, network.scale_weight_norms).

Every process computes the same global batch, noise and timesteps (one generator, same seed) and
takes its own slice, so N processes train exactly what one process would with N times the batch.
A step whose loss or gradient is not finite is skipped by every process together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lora_offset.training import losses, network_regularizers, noise
from lora_offset.training.text import encode_prompts
from lora_offset.training.timesteps import TimestepDistribution, sample_timesteps


@dataclass
class StepParts:
    """What an optimizer step uses; built once by train()."""

    config: Any  # lora_offset.config.Config
    accelerator: Any
    unet: Any  # as prepared by accelerate (DDP-wrapped under multi-process)
    forward_unet: Any  # unet, or its torch.compile'd version
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_cache: dict[str, torch.Tensor] | None  # caption -> embedding, when the text encoder is frozen
    optimizer: Any
    trainable: list[torch.nn.Parameter]
    dataset: Any  # DatasetGroup
    generator: torch.Generator  # noise and timesteps: independent of the data order
    alphas_cumprod: torch.Tensor  # float32, on the device
    num_train_timesteps: int
    weight_dtype: torch.dtype
    max_steps: int  # of the run (a fractional caption token_warmup_step is a share of it)
    max_norm_stats: Any = None  # network_regularizers.MaxNormStats of the last step, with network.scale_weight_norms


def optimizer_step(parts: StepParts, step: int) -> float:
    """Run global step `step` (its micro-batches, then the update). Returns the mean loss, NaN if skipped."""
    t, accelerator, optimizer = parts.config.training, parts.accelerator, parts.optimizer
    loss_sum = 0.0
    for micro in range(t.gradient_accumulation_steps):
        batch = parts.dataset.batch(step * t.gradient_accumulation_steps + micro, optimizer_step=step,
                                    max_steps=parts.max_steps)
        with accelerator.accumulate(parts.unet):
            loss = batch_loss(parts, batch)
            if not finite_everywhere(accelerator, loss):
                # Skipping keeps a NaN out of the weights; the optimizer sees no update. Every
                # process skips together, or the others would wait forever in backward's all-reduce.
                optimizer.zero_grad(set_to_none=True)
                return float("nan")
            accelerator.backward(loss)
            loss_sum += loss.detach().item() / t.gradient_accumulation_steps
            if accelerator.sync_gradients:
                grad_norm = grad_total_norm(parts.trainable)
                if not math.isfinite(grad_norm) and accelerator.scaler is None:
                    optimizer.zero_grad(set_to_none=True)
                    return float("nan")
                if t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(parts.trainable, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bound = parts.config.network.scale_weight_norms
                if bound:  # kohya's max-norm, right after the update
                    models = [accelerator.unwrap_model(m) for m in (parts.unet, parts.text_encoder)]  # a frozen one has none
                    parts.max_norm_stats = network_regularizers.scale_weight_norms(models, bound)
    return loss_sum


def batch_loss(parts: StepParts, batch, generator: torch.Generator | None = None,
               timestep: int | None = None) -> torch.Tensor:
    """This process's loss on its slice of one (global) micro-batch. Noise and timesteps come from
    `generator` (default: the run's); `timestep` fixes every sample's timestep (the validation loss)."""
    config, accelerator, device = parts.config, parts.accelerator, parts.accelerator.device
    generator = parts.generator if generator is None else generator
    t, noise_cfg, prediction_type = config.training, config.noise, config.model.prediction_type
    # Latents of the whole global batch (cached, or encoded now), in fp32 for the noise math.
    if batch.latents is not None:
        latents = batch.latents.to(device, torch.float32)
    else:
        latents = encode_images(parts.vae, batch.pixel_values.to(device), parts.weight_dtype).float()
    n = latents.shape[0]
    # Noise and timesteps for the whole global batch, then this process's slice.
    eps = noise.sample_noise(latents, noise_cfg, generator).to(device)
    if timestep is None:
        timesteps = sample_timesteps(TimestepDistribution.from_config(noise_cfg), n, parts.num_train_timesteps,
                                     generator, min_timestep=noise_cfg.min_timestep, max_timestep=noise_cfg.max_timestep)
    else:
        timesteps = torch.full((n,), int(timestep), dtype=torch.long)
    timesteps = timesteps.to(device)
    noisy_eps = eps
    if noise_cfg.input_perturbation > 0:
        noisy_eps = noise.perturb_noise(eps, noise_cfg.input_perturbation, generator).to(device)
    mine = process_slice(batch.is_reg, accelerator.process_index, accelerator.num_processes)
    latents, eps, noisy_eps, timesteps = latents[mine], eps[mine], noisy_eps[mine], timesteps[mine]
    is_reg = batch.is_reg[mine].to(device)
    masks = batch.masks[mine].to(device) if batch.masks is not None else None  # loss weights at latent size
    captions = [batch.captions[i] for i in mine.tolist()]

    noisy_latents = noise.add_noise(latents, noisy_eps, timesteps, parts.alphas_cumprod)
    target = noise.training_target(latents, eps, timesteps, parts.alphas_cumprod, prediction_type)
    if parts.text_cache is not None:
        cond = torch.stack([parts.text_cache[c] for c in captions]).to(device, parts.weight_dtype)
    else:
        cond = encode_prompts(parts.tokenizer, parts.text_encoder, captions, t.clip_skip, t.max_token_length)
    with accelerator.autocast():
        pred = parts.forward_unet(noisy_latents.to(parts.weight_dtype), timesteps, cond).sample
    huber_c = None
    if losses.LOSS_TYPES[t.loss_type][1]:
        huber_c = losses.huber_threshold(t.huber_schedule, t.huber_c, timesteps, parts.alphas_cumprod,
                                         parts.num_train_timesteps)
    per_sample = losses.per_sample_loss(pred.float(), target.float(), t.loss_type, huber_c, masks)
    weights = losses.loss_weights(noise_cfg.min_snr_gamma, t.debiased_estimation, parts.alphas_cumprod, timesteps,
                                  prediction_type)
    return losses.dreambooth_loss(per_sample, is_reg, t.prior_loss_weight, weights)


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The distribution's mean, not a sample: cached and uncached latents must agree exactly (resume).
    latents = vae.encode(pixel_values.to(vae.device, dtype)).latent_dist.mean
    return latents * vae.config.scaling_factor


def process_slice(is_reg: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Indices of this process's share of a global batch: an equal part of the instance and of the class samples."""
    inst = torch.nonzero(~is_reg).flatten()
    reg = torch.nonzero(is_reg).flatten()
    parts = [inst.chunk(world)[rank] if len(inst) >= world else inst, reg.chunk(world)[rank] if len(reg) >= world else reg]
    return torch.cat(parts)


def finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite in every process (one all-reduce under multi-process training)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def grad_total_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return torch.stack(grads).norm().item()
