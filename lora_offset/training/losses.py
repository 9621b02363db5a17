"""The training loss, as pure functions: per-sample error, its weights, the DreamBooth combination.

    per_sample_loss(pred, target)                    MSE over all but the batch dim, shape (B,), float32
    min_snr_weights(snr, gamma, prediction_type)     Hang et al. 2023, finite at snr = 0 (see there)
    loss_weights(noise_cfg, alphas_cumprod, timesteps, prediction_type)
                                                     the per-sample weights a config asks for, or None
    dreambooth_loss(per_sample, is_reg, prior_loss_weight, weights)
                                                     mean(instance) + prior_loss_weight * mean(class)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_offset.training.noise import PREDICTION_TYPES, snr


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over every dim but the first, in float32: shape (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    squared = F.mse_loss(pred.float(), target.float(), reduction="none")
    return squared.mean(dim=tuple(range(1, squared.ndim)))


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per sample.

    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1).
    At snr = 0 (zero terminal SNR's last step) the epsilon formula is 0/0; we return 1 there, its limit
    as snr -> 0 (every step with snr < gamma gets exactly 1), so the weight is continuous in t.
    The v_prediction formula is finite there and gives 0 (its x0-space weight min(snr, gamma) is 0).
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        positive = snr > 0
        return torch.where(positive, clipped / torch.where(positive, snr, torch.ones_like(snr)), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def loss_weights(noise_cfg, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                 prediction_type: str) -> torch.Tensor | None:
    """Per-sample loss weights from a noise config (min-SNR-gamma), or None for unweighted."""
    if noise_cfg.min_snr_gamma <= 0:
        return None
    return min_snr_weights(snr(alphas_cumprod, timesteps), noise_cfg.min_snr_gamma, prediction_type)


def dreambooth_loss(per_sample: torch.Tensor, is_reg: torch.Tensor, prior_loss_weight: float,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE(instance) + prior_loss_weight * MSE(class), each the mean over its samples."""
    if weights is not None:
        per_sample = per_sample * weights
    loss = per_sample[~is_reg].mean()
    if is_reg.any():
        loss = loss + prior_loss_weight * per_sample[is_reg].mean()
    return loss
