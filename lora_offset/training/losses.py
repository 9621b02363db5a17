"""The training loss, as pure functions: per-element error, per-sample weights, the DreamBooth combination.

Each loss type and each Huber schedule is one entry of a registry (kohya sd-scripts' meanings,
library/train_util.py `conditional_loss`, `get_huber_threshold_if_needed`):

    l2          (pred - target)^2
    l1          |pred - target|
    huber       2 c (sqrt((pred - target)^2 + c^2) - c)      ~ d^2 near 0, ~ 2c|d| far out
    smooth_l1   2 (sqrt((pred - target)^2 + c^2) - c)        ~ d^2/c near 0, ~ 2|d| far out

The Huber threshold c per sample (huber_schedule, for huber and smooth_l1):
    constant     c = huber_c
    exponential  c = exp(-t ln(1/huber_c) / T): 1 at t = 0 down to huber_c at t = T
    snr          c = (1 - huber_c) / (1 + sigma_t)^2 + huber_c, sigma_t = sqrt((1 - ab_t) / ab_t)

Per-sample weights, multiplied together when several are on:
    min-SNR-gamma (Hang et al. 2023)   epsilon: min(snr, gamma) / snr; v: min(snr, gamma) / (snr + 1)
    debiased estimation (kohya)        epsilon: 1 / sqrt(snr); v: 1 / (snr + 1); snr capped at 1000

    per_sample_loss(pred, target, loss_type="l2", huber_c=None, mask=None)
                                                  mean over all but the batch dim, (B,), float32; a mask
                                                  weights it, normalised by the mask's area (masked_mean)
    loss_weights(loss_cfg, noise_cfg, alphas_cumprod, timesteps, prediction_type)   (B,) or None
    dreambooth_loss(per_sample, is_reg, prior_loss_weight, weights)   mean(instance) + w * mean(class)
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lora_offset.training.noise import PREDICTION_TYPES, snr

SNR_CAP = 1000.0  # kohya: snr at t = 0 is huge; debiased estimation caps it here
DEBIASED_SNR_FLOOR = 1e-4  # 1/sqrt(snr) is infinite at snr = 0 (zero terminal SNR): the weight stops at 100


def _l2(diff: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    return diff * diff


def _l1(diff: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    return diff.abs()


def _huber(diff: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 2 * c * (torch.sqrt(diff * diff + c * c) - c)


def _smooth_l1(diff: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 2 * (torch.sqrt(diff * diff + c * c) - c)


# training.loss_type -> (elementwise loss of pred - target and the per-sample threshold c, needs c)
LOSS_TYPES: dict[str, tuple[Callable, bool]] = {
    "l2": (_l2, False),
    "l1": (_l1, False),
    "huber": (_huber, True),
    "smooth_l1": (_smooth_l1, True),
}


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per sample, averaged over every dim but the first, in float32: shape (B,).

    `huber_c` (B,) is the threshold of huber and smooth_l1 (see huber_threshold); unused otherwise.
    `mask` (B, 1, H, W) in [0, 1]: the average is weighted by it (see masked_mean).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    fn, needs_c = LOSS_TYPES[loss_type]
    c = None
    if needs_c:
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs the per-sample threshold huber_c")
        c = huber_c.float().reshape(-1, *([1] * (pred.ndim - 1)))
    elementwise = fn(pred.float() - target.float(), c)
    return masked_mean(elementwise, mask)


def masked_mean(elementwise: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of `elementwise` (B, C, H, W) over every dim but the first: (B,).

    With `mask` (B, 1, H, W) (kohya's alpha_mask / masked_loss, at latent size): each element counts with
    its pixel's mask value and the sum is divided by the mask's area (C x the sum of the mask), so a
    sample's loss is the mean over the region that counts, whatever its size (kohya multiplies by the mask
    and takes the plain mean, which shrinks the loss of a small subject). An all-zero mask gives 0.
    """
    dims = tuple(range(1, elementwise.ndim))
    if mask is None:
        return elementwise.mean(dim=dims)
    if mask.shape[0] != elementwise.shape[0] or mask.shape[2:] != elementwise.shape[2:] or mask.shape[1] != 1:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit the loss shape {tuple(elementwise.shape)}: "
                         "expected (B, 1, H, W)")
    weights = mask.to(elementwise.dtype).expand_as(elementwise)
    area = weights.sum(dim=dims)
    return (elementwise * weights).sum(dim=dims) / area.clamp(min=torch.finfo(area.dtype).tiny)


def _constant(huber_c: float, timesteps, alphas_cumprod, num_train_timesteps) -> torch.Tensor:
    return torch.full(timesteps.shape, float(huber_c), dtype=torch.float32, device=timesteps.device)


def _exponential(huber_c: float, timesteps, alphas_cumprod, num_train_timesteps) -> torch.Tensor:
    rate = -math.log(huber_c) / num_train_timesteps
    return torch.exp(-rate * timesteps.float())


def _snr_schedule(huber_c: float, timesteps, alphas_cumprod, num_train_timesteps) -> torch.Tensor:
    ab = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    sigmas = ((1.0 - ab) / ab) ** 0.5  # inf where ab = 0: c is then huber_c
    return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c


# training.huber_schedule -> c(huber_c, timesteps, alphas_cumprod, T), float32 (B,)
HUBER_SCHEDULES: dict[str, Callable] = {"constant": _constant, "exponential": _exponential, "snr": _snr_schedule}


def huber_threshold(schedule: str, huber_c: float, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                    num_train_timesteps: int) -> torch.Tensor:
    """The Huber threshold c per sample for `timesteps` (see the module docstring)."""
    if schedule not in HUBER_SCHEDULES:
        raise ValueError(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {schedule!r}")
    if not 0 < huber_c <= 1:
        raise ValueError(f"huber_c must be in (0, 1], got {huber_c}")
    return HUBER_SCHEDULES[schedule](huber_c, timesteps, alphas_cumprod, num_train_timesteps)


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


def debiased_weights(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """kohya's debiased estimation: 1/sqrt(snr) (epsilon) or 1/(snr + 1) (v), snr capped at 1000.

    kohya divides by zero at snr = 0 under epsilon; here snr is floored at 1e-4 (weight 100). SD 1.x's
    own schedule never gets there (its smallest snr is ~0.005): only zero terminal SNR does.
    """
    capped = snr.clamp(max=SNR_CAP)
    if prediction_type == "epsilon":
        return 1 / torch.sqrt(capped.clamp(min=DEBIASED_SNR_FLOOR))
    if prediction_type == "v_prediction":
        return 1 / (capped + 1)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def loss_weights(min_snr_gamma: float, debiased_estimation: bool, alphas_cumprod: torch.Tensor,
                 timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor | None:
    """The per-sample weights asked for (min-SNR, debiased, or their product), or None for unweighted."""
    weights = None
    values = snr(alphas_cumprod, timesteps)
    if min_snr_gamma > 0:
        weights = min_snr_weights(values, min_snr_gamma, prediction_type)
    if debiased_estimation:
        debiased = debiased_weights(values, prediction_type)
        weights = debiased if weights is None else weights * debiased
    return weights


def dreambooth_loss(per_sample: torch.Tensor, is_reg: torch.Tensor, prior_loss_weight: float,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """loss(instance) + prior_loss_weight * loss(class), each the mean over its samples."""
    if weights is not None:
        per_sample = per_sample * weights
    loss = per_sample[~is_reg].mean()
    if is_reg.any():
        loss = loss + prior_loss_weight * per_sample[is_reg].mean()
    return loss
