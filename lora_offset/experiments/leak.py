"""The signal leak at the first sampling step: measure it, start from it, and read the model's answer to it.

SD 1.x's schedule keeps sqrt(abar) ~ 0.07-0.09 of the image at the first sampling step, and the
channel means of that leak are what the model reads an image's brightness from. Everaert et al. 2024
("Exploiting the Signal-Leak Bias in Diffusion Models") turn that into a training-free fix: start
sampling from x_T = sqrt(abar) * leak + sqrt(1 - abar) * eps, with the leak drawn from the target
images' latent statistics. Here the statistics are per-channel means (the lowest-frequency part):
    leak_c ~ N(mean_c, std_c), constant over the latent, one draw per image,
with mean_c / std_c the mean / spread across a folder's images of each image's latent channel mean.

Pure functions take tensors; `folder_statistics` is the one that reads images (through the VAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class LeakStatistics:
    """Per-channel mean and spread across images of the (scaled) latent channel means of some images."""
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    n: int

    def to_dict(self) -> dict:
        return {"mean": [round(float(v), 5) for v in self.mean], "std": [round(float(v), 5) for v in self.std],
                "n": self.n}


def channel_statistics(latents: torch.Tensor) -> LeakStatistics:
    """Statistics of (N, C, H, W) scaled latents: mean and std (population) over images of each channel's mean."""
    if latents.ndim != 4 or latents.shape[0] == 0:
        raise ValueError(f"expected latents (N, C, H, W) with N >= 1, got {tuple(latents.shape)}")
    means = latents.float().mean(dim=(2, 3))
    return LeakStatistics(means.mean(dim=0), means.std(dim=0, unbiased=False), int(latents.shape[0]))


def draw_leaks(stats: LeakStatistics, seeds, fraction: float = 1.0) -> torch.Tensor:
    """(N, C) leak channel means, one per seed: fraction * N(mean, std), drawn from a generator seeded
    with seed + 1_000_003 (independent of the seed's starting noise)."""
    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed) + 1_000_003)
        rows.append(stats.mean + stats.std * torch.randn(stats.mean.shape, generator=g))
    return fraction * torch.stack(rows)


def leak_start(noise: torch.Tensor, leak: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """x_T = sqrt(1 - abar) * noise + sqrt(abar) * leak, the leak (N, C) constant over each channel:
    the forward process applied to an image whose latent is that constant."""
    if leak.shape != noise.shape[:2]:
        raise ValueError(f"leak shape {tuple(leak.shape)} does not match noise {tuple(noise.shape)}")
    a = float(alpha_bar)
    return (1 - a) ** 0.5 * noise + a**0.5 * leak.to(noise.dtype).view(*leak.shape, 1, 1)


def first_step_alpha_bar(scheduler, steps: int) -> float:
    """abar at the first timestep the scheduler visits with `steps` inference steps (961 for DDIM-25 on SD)."""
    scheduler.set_timesteps(steps)
    t = int(scheduler.timesteps[0])
    return float(scheduler.alphas_cumprod[t])


def z_score(alpha_bar: float, channel_mean: float, latent_pixels: int, offset: float = 0.0) -> float:
    """How far a leak sqrt(abar) * m sits from pure noise, in units of the noise's channel-mean spread:
    z = sqrt(abar) * |m| / sqrt(1 / (H*W) + offset**2) (../shared/OFFSET-NOISE-SCIENCE.md)."""
    return abs(channel_mean) * alpha_bar**0.5 / (1.0 / latent_pixels + offset**2) ** 0.5


@torch.no_grad()
def encode_folder(vae, folder: str | Path, resolution: int, limit: int = 256) -> torch.Tensor:
    """Scaled latent means of up to `limit` images of a folder (as the trainer encodes them, centre-cropped)."""
    from lora_offset.errors import UserError
    from lora_offset.training.data.images import fit_to_bucket, is_image_file, load_image, to_tensor

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--start-from-leak {folder}: not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))[:limit]
    if not paths:
        raise UserError(f"--start-from-leak {folder}: no images (.png, .jpg, .webp, ...) in the folder")
    size = (resolution, resolution)
    latents = []
    for start in range(0, len(paths), 16):
        px = torch.stack([to_tensor(fit_to_bucket(load_image(p, [size]), size)) for p in paths[start:start + 16]])
        z = vae.encode(px.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        latents.append(z.float().cpu())
    return torch.cat(latents)


def folder_statistics(vae, folder: str | Path, resolution: int) -> LeakStatistics:
    return channel_statistics(encode_folder(vae, folder, resolution))
