"""The training objective's noise, timesteps and targets, as pure functions.

Nothing here does I/O or touches a global random state: every random function takes a
``torch.Generator | None`` and passes it to ``torch.randn``/``torch.rand``/``torch.randint``, so a
seeded generator reproduces every draw. Draws happen on the generator's device and are moved to the
latents' device: a CPU generator gives the same noise whether the latents live on CPU or GPU.
Latents ``x`` have shape (B, C, H, W); ``timesteps`` are int64 of shape (B,).

Noise
    offset_noise(x, offset, generator=None, *, adaptive_offset=0.0, random_strength=False, base_noise=None)
        ``n = randn_like(x) + s_bc * randn(B, C, 1, 1)``: a per-(sample, channel) constant on top of white
        noise, so the spatial mean of each channel of ``n`` has variance 1/(H*W) + s**2 instead of
        1/(H*W). ``s_bc = clamp(u_b * offset + adaptive_offset * |mean_hw(x_bc)|, min=0)`` where
        ``u_b ~ U(0, 1)`` per sample when ``random_strength`` (else 1). Both options follow kohya
        sd-scripts, except that kohya draws one ``u`` per batch and we draw one per sample.
        With ``offset == adaptive_offset == 0`` it returns ``torch.randn(x.shape, generator=g)``
        exactly and draws nothing more.
    pyramid_noise(x, iterations, discount, generator=None, base_noise=None)
        Multi-resolution noise: ``w + sum_{i=1..iterations} discount**i * up(w_i)`` where ``w_i`` is
        white noise at (H, W) / r_i**i with ``r_i ~ U(2, 4)`` per level (kohya's random factor, so
        levels do not share a grid), ``up`` is bilinear upsampling back to (H, W); stops after the
        level that reaches size 1. Then each (sample, channel) is divided by its spatial std (unit
        std; the per-channel mean is kept, that is the low-frequency energy we want). Unlike kohya we
        start at i = 1: kohya's i = 0 term adds a second full-resolution white noise.
    sample_noise(x, noise_cfg, generator=None)
        Composition from a config with attributes ``offset``, ``adaptive_offset``,
        ``offset_random_strength``, ``pyramid_iterations``, ``pyramid_discount``. Order: white noise,
        then pyramid (renormalized), then the offset added last, so ``offset`` keeps its meaning (a
        per-channel constant of std ``offset`` on unit-std noise). kohya adds the offset first and
        the pyramid's renormalization then shrinks it.
    perturb_noise(noise, gamma, generator=None)
        Input perturbation (Ning et al. 2023): ``noise + gamma * randn_like(noise)``; build the noisy
        input from it while the training target stays ``noise``.

Schedule
    sample_timesteps(batch_size, num_train_timesteps, generator=None, *, min_timestep=0, max_timestep=None)
        Uniform int64 timesteps in [min_timestep, max_timestep) (default [0, T)).
    zero_terminal_snr_betas(betas)
        Lin et al. 2023, Algorithm 1: rescale so that alpha_bar_T = 0 and alpha_bar_0 is unchanged.
        Same math as diffusers' ``rescale_zero_terminal_snr``, computed in float64.
    training_scheduler(scheduler_config, *, zero_terminal_snr=False, prediction_type=None)
        A diffusers DDPMScheduler for training from any SD scheduler config; with zero_terminal_snr it
        sets ``rescale_betas_zero_snr=True`` and ``timestep_spacing="trailing"``.

Objective
    add_noise(latents, noise, timesteps, alphas_cumprod)   sqrt(ab)*x + sqrt(1-ab)*n (= diffusers')
    training_target(latents, noise, timesteps, alphas_cumprod, prediction_type)
        "epsilon": noise; "v_prediction": sqrt(ab)*noise - sqrt(1-ab)*latents (= diffusers' get_velocity)
    snr(alphas_cumprod, timesteps)                          ab / (1 - ab) at the timesteps, float32

The loss and its weights (MSE, min-SNR) are in lora_offset.training.losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _draw_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    """Draw on the generator's device (a CPU generator then gives the same numbers for CPU and GPU
    latents); results are moved to `like`'s device."""
    return like.device if generator is None else generator.device


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None):
    device = _draw_device(generator, like)
    return torch.randn(shape, generator=generator, dtype=dtype or like.dtype, device=device).to(like.device)


def _rand(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=_draw_device(generator, like)).to(like.device)


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) so it broadcasts against a tensor of `ndim` dims."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------- noise


def offset_noise(
    x: torch.Tensor,
    offset: float,
    generator: torch.Generator | None = None,
    *,
    adaptive_offset: float = 0.0,
    random_strength: bool = False,
    base_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """White noise plus a per-(sample, channel) constant of std `s_bc` (see the module docstring).

    Draw order on `generator`: base noise (unless `base_noise` is given), then U(0,1) of shape (B,)
    if `random_strength`, then randn(B, C, 1, 1). With no offset at all nothing but the base is drawn.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    noise = _randn(x.shape, x, generator) if base_noise is None else base_noise
    if offset == 0 and adaptive_offset == 0:
        return noise
    batch, channels = x.shape[:2]
    strength = torch.full((batch,), float(offset), dtype=torch.float32, device=x.device)
    if random_strength:
        strength = strength * _rand(batch, x, generator)
    strength = _per_sample(strength, x.ndim)  # (B, 1, 1, 1)
    if adaptive_offset != 0:
        channel_mean = x.float().mean(dim=tuple(range(2, x.ndim)), keepdim=True).abs()  # (B, C, 1, 1)
        strength = (strength + adaptive_offset * channel_mean).clamp(min=0)
    constant = _randn((batch, channels) + (1,) * (x.ndim - 2), x, generator, dtype=torch.float32)
    return noise + (strength * constant).to(noise.dtype)


def pyramid_noise(
    x: torch.Tensor,
    iterations: int,
    discount: float,
    generator: torch.Generator | None = None,
    base_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-resolution noise with unit spatial std per (sample, channel) (see the module docstring).

    Returns `base_noise` (or fresh white noise) unchanged when `iterations` is 0 or H*W == 1.
    """
    if iterations < 0:
        raise ValueError(f"pyramid iterations must be >= 0, got {iterations}")
    if x.ndim != 4:
        raise ValueError(f"pyramid noise needs latents of shape (B, C, H, W), got {tuple(x.shape)}")
    noise = _randn(x.shape, x, generator) if base_noise is None else base_noise
    batch, channels, height, width = x.shape
    if iterations == 0 or height * width == 1:
        return noise
    total = noise.float()
    for level in range(1, iterations + 1):
        factor = 2.0 + 2.0 * _rand((), x, generator).item()
        size = (max(1, int(height / factor**level)), max(1, int(width / factor**level)))
        low = _randn((batch, channels, *size), x, generator, dtype=torch.float32)
        total = total + discount**level * F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        if min(size) == 1:  # nothing lower left to add (kohya stops here too)
            break
    std = total.std(dim=(2, 3), keepdim=True).clamp(min=1e-12)
    return (total / std).to(noise.dtype)


def sample_noise(x: torch.Tensor, noise_cfg, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise for latents `x` from a noise config (duck-typed): white -> pyramid -> + offset."""
    noise = _randn(x.shape, x, generator)
    iterations = int(getattr(noise_cfg, "pyramid_iterations", 0) or 0)
    if iterations > 0:
        noise = pyramid_noise(x, iterations, float(noise_cfg.pyramid_discount), generator, base_noise=noise)
    return offset_noise(
        x,
        float(getattr(noise_cfg, "offset", 0.0) or 0.0),
        generator,
        adaptive_offset=float(getattr(noise_cfg, "adaptive_offset", 0.0) or 0.0),
        random_strength=bool(getattr(noise_cfg, "offset_random_strength", False)),
        base_noise=noise,
    )


def perturb_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Input perturbation: `noise + gamma * randn_like(noise)` (the target stays `noise`)."""
    if gamma < 0:
        raise ValueError(f"input perturbation gamma must be >= 0, got {gamma}")
    if gamma == 0:
        return noise
    return noise + gamma * _randn(noise.shape, noise, generator)


# -------------------------------------------------------------------------------------- schedule


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    *,
    min_timestep: int = 0,
    max_timestep: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform int64 timesteps in [min_timestep, max_timestep), shape (batch_size,)."""
    high = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < high <= num_train_timesteps:
        raise ValueError(
            f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps}, got [{min_timestep}, {high})"
        )
    draw_device = device if generator is None else generator.device
    timesteps = torch.randint(min_timestep, high, (batch_size,), generator=generator, device=draw_device)
    return timesteps.to(device)  # int64 (randint's default); device None: where it was drawn


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so its last value is 0 and its
    first is unchanged, then convert back to betas (the last beta becomes 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def training_scheduler(scheduler_config, *, zero_terminal_snr: bool = False, prediction_type: str | None = None):
    """A diffusers DDPMScheduler with the betas of `scheduler_config` (a scheduler's `.config` or a dict).

    zero_terminal_snr: `rescale_betas_zero_snr=True` (diffusers applies Algorithm 1 to its betas) and
    `timestep_spacing="trailing"` (so inference starts at t = T). Lin et al. pair it with v-prediction
    and `guidance_rescale` (~0.7) at sampling time; pass prediction_type="v_prediction" for that.
    """
    from diffusers import DDPMScheduler

    overrides: dict = {}
    if zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        overrides["prediction_type"] = prediction_type
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return DDPMScheduler.from_config({**config, **overrides})


# ------------------------------------------------------------------------------------- objective


def _alpha_bar(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Cast before indexing and taking roots, as diffusers does, so results match it bit for bit.
    ab = alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
    return _per_sample(ab, like.ndim)


def add_noise(latents, noise, timesteps, alphas_cumprod) -> torch.Tensor:
    """Forward process: sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise."""
    ab = _alpha_bar(alphas_cumprod, timesteps, latents)
    return ab**0.5 * latents + (1 - ab) ** 0.5 * noise


def training_target(latents, noise, timesteps, alphas_cumprod, prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity sqrt(ab)*n - sqrt(1-ab)*x."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        ab = _alpha_bar(alphas_cumprod, timesteps, latents)
        return ab**0.5 * noise - (1 - ab) ** 0.5 * latents
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at `timesteps` (float32; 0 where alpha_bar = 0)."""
    ab = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return ab / (1.0 - ab)


__all__ = [
    "PREDICTION_TYPES",
    "add_noise",
    "offset_noise",
    "perturb_noise",
    "pyramid_noise",
    "sample_noise",
    "sample_timesteps",
    "snr",
    "training_scheduler",
    "training_target",
    "zero_terminal_snr_betas",
]
