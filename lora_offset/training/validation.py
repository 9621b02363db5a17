"""The validation loss (kohya's `validation_split`): the held-out images' loss at fixed timesteps and noise.

As kohya's train_network.py: every held-out batch is scored at 4 timesteps spread evenly inside
[noise.min_timestep, noise.max_timestep] (200, 400, 600 and 800 for SD's 1000), and the validation
loss is the mean over batches and timesteps, logged as `loss/validation`, every
`training.validate_every_n_steps` steps (0: at the end of each epoch). Unlike kohya, whose numbers
depend on the random state of the moment, the noise of batch k at timestep j comes from its own
generator seeded by (validation seed, k, j), the batches are the held-out images' first epoch under
that seed, and the LoRA's dropout is off: the same adapter gives the same validation loss in every
run and after `--resume`, and validating draws nothing from the training's random streams.
"""

from __future__ import annotations

import hashlib

import torch

from lora_offset.training.step import StepParts, batch_loss

NUM_TIMESTEPS = 4  # kohya's NUM_VALIDATION_TIMESTEPS


def validation_timesteps(min_timestep: int, max_timestep: int, count: int = NUM_TIMESTEPS) -> list[int]:
    """`count` timesteps evenly inside (min, max), ends excluded: kohya's linspace(min, max, count + 2)[1:-1]."""
    return [min_timestep + (max_timestep - min_timestep) * k // (count + 1) for k in range(1, count + 1)]


def noise_generator(seed: int, batch: int, timestep_index: int) -> torch.Generator:
    digest = hashlib.sha256(repr(("validation", int(seed), batch, timestep_index)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def validation_seed(config) -> int:
    """The validation noise's seed: the first validating dataset's validation_seed, else training.seed (kohya)."""
    seeds = [d.validation_seed for d in config.datasets if d.validation_split > 0 and d.validation_seed is not None]
    return seeds[0] if seeds else config.training.seed


def validation_due(t, calendar, step: int) -> bool:
    """After optimizer step `step`: every validate_every_n_steps, else at the end of each epoch."""
    if t.validate_every_n_steps:
        return step % t.validate_every_n_steps == 0
    return calendar.epoch_ends(step)


@torch.no_grad()
def validation_loss(parts: StepParts, held_out, seed: int) -> float:
    """The mean loss of the DatasetGroup `held_out` (its first epoch) at the validation timesteps."""
    noise_cfg = parts.config.noise
    high = parts.num_train_timesteps if noise_cfg.max_timestep is None else noise_cfg.max_timestep
    timesteps = validation_timesteps(noise_cfg.min_timestep, high)
    accelerator = parts.accelerator
    models = [m for m in (parts.unet, parts.text_encoder) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()  # LoRA dropout off: the same adapter, the same numbers
    try:
        losses = []
        for k in range(held_out.steps_per_epoch):
            batch = held_out.batch(k)
            for j, timestep in enumerate(timesteps):
                loss = batch_loss(parts, batch, generator=noise_generator(seed, k, j), timestep=timestep)
                losses.append(loss.detach().float().reshape(1))
        total = torch.cat(losses).mean()
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total.to(accelerator.device), reduction="mean")
        return float(total)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
