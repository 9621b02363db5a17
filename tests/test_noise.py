"""Noise strategies and schedule: statistics with tolerances from the sampling error,
exact equality where the math allows it, and equality with diffusers' own implementations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from diffusers.training_utils import compute_snr
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_offset.training import losses as L
from lora_offset.training import noise as N
from lora_offset.tiny import SD15_SCHEDULER_CONFIG


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def channel_means(n: torch.Tensor) -> torch.Tensor:
    """Spatial mean of every (sample, channel): a flat tensor of B*C values."""
    return n.mean(dim=(2, 3)).flatten()


def assert_variance(samples: torch.Tensor, expected: float, sigmas: float = 5.0) -> None:
    """Sample variance of (near-)Gaussian values vs. its expectation; sd of the estimate is
    expected * sqrt(2 / (N - 1))."""
    count = samples.numel()
    tolerance = sigmas * expected * math.sqrt(2.0 / (count - 1))
    assert abs(samples.double().var().item() - expected) < tolerance, (samples.var().item(), expected, tolerance)


@pytest.fixture(scope="module")
def sd15():
    return DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)


# ---------------------------------------------------------------------------------- offset noise


@pytest.mark.parametrize("offset", [0.0, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("hw", [(8, 8), (16, 24), (64, 64)])
def test_offset_noise_channel_mean_variance(offset, hw):
    x = torch.zeros(1024, 4, *hw)  # 4096 (sample, channel) pairs
    n = N.offset_noise(x, offset, gen(1))
    assert_variance(channel_means(n), 1.0 / (hw[0] * hw[1]) + offset**2)
    # The offset is constant over the image: within a channel the noise is still unit white noise.
    centred = n - n.mean(dim=(2, 3), keepdim=True)
    assert abs(centred.std().item() - 1.0) < 0.01


def test_offset_noise_distinguishes_offsets_at_sd_resolution():
    # At 64x64 (SD 1.5's latent) white noise leaves a channel mean of std 1/64 = 0.0156; offset 0.1
    # makes it ~0.101. This is the signal the model learns to move.
    x = torch.zeros(256, 4, 64, 64)
    plain = channel_means(N.offset_noise(x, 0.0, gen(2))).std().item()
    offset = channel_means(N.offset_noise(x, 0.1, gen(2))).std().item()
    assert 0.0140 < plain < 0.0172
    assert 0.092 < offset < 0.110


def test_offset_zero_equals_standard_noise_for_the_same_seed():
    x = torch.randn(3, 4, 8, 8)
    expected = torch.randn(x.shape, generator=gen(7))
    assert torch.equal(N.offset_noise(x, 0.0, gen(7)), expected)
    assert torch.equal(N.offset_noise(x, 0.0, gen(7), random_strength=True), expected)
    assert torch.equal(N.sample_noise(x, SimpleNamespace(offset=0.0), gen(7)), expected)
    # and it draws nothing more from the generator than torch.randn does
    g = gen(7)
    N.offset_noise(x, 0.0, g)
    reference = gen(7)
    torch.randn(x.shape, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())


def test_offset_noise_is_reproducible_and_seed_dependent():
    x = torch.zeros(2, 4, 8, 8)
    a = N.offset_noise(x, 0.1, gen(3), adaptive_offset=0.2, random_strength=True)
    b = N.offset_noise(x, 0.1, gen(3), adaptive_offset=0.2, random_strength=True)
    c = N.offset_noise(x, 0.1, gen(4), adaptive_offset=0.2, random_strength=True)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_offset_noise_exact_formula():
    x = torch.randn(5, 4, 6, 6) * 0.5 + torch.tensor([0.0, 1.0, -2.0, 0.3]).view(1, 4, 1, 1)
    offset, adaptive = 0.1, 0.05
    got = N.offset_noise(x, offset, gen(5), adaptive_offset=adaptive)
    g = gen(5)
    base = torch.randn(x.shape, generator=g)
    constant = torch.randn(5, 4, 1, 1, generator=g)
    strength = offset + adaptive * x.mean(dim=(2, 3), keepdim=True).abs()
    torch.testing.assert_close(got, base + strength * constant, rtol=0, atol=1e-6)


def test_adaptive_offset_scales_with_absolute_channel_mean():
    # channel 0 mean 0, channel 1 mean +2, channel 2 mean -2: s_bc = 0.1, 0.2, 0.2
    means = torch.tensor([0.0, 2.0, -2.0]).view(1, 3, 1, 1)
    x = torch.zeros(4096, 3, 8, 8) + means
    n = N.offset_noise(x, 0.1, gen(6), adaptive_offset=0.05)
    per_channel = n.mean(dim=(2, 3))  # (B, 3)
    for channel, s in enumerate([0.1, 0.2, 0.2]):
        assert_variance(per_channel[:, channel], 1 / 64 + s**2)


def test_negative_adaptive_offset_is_clamped_at_zero():
    # s + a*|mean| = 0.1 - 0.5*1 < 0 -> clamped to 0: the noise is the plain base noise.
    x = torch.ones(4, 4, 8, 8)
    got = N.offset_noise(x, 0.1, gen(8), adaptive_offset=-0.5)
    assert torch.equal(got, torch.randn(x.shape, generator=gen(8)))


def test_random_strength_scales_offset_per_sample_in_0_s():
    x = torch.zeros(4096, 4, 8, 8)
    s = 0.3
    n = N.offset_noise(x, s, gen(9), random_strength=True)
    base = torch.randn(x.shape, generator=gen(9))
    g = gen(9)
    torch.randn(x.shape, generator=g)
    u = torch.rand(4096, generator=g)
    constant = torch.randn(4096, 4, 1, 1, generator=g)
    # one strength u_b * s in [0, s) per sample, shared by its channels
    torch.testing.assert_close(n - base, ((u * s).view(-1, 1, 1, 1) * constant).expand_as(n), rtol=0, atol=1e-6)
    well_conditioned = constant.abs() > 0.5
    scale = ((n - base)[:, :, :1, :1] / constant)[well_conditioned]
    assert scale.min() >= -1e-5 and scale.max() <= s + 1e-5 and scale.max() > 0.95 * s
    # statistically: E[(u s z)^2] = s^2/3; the estimate's spread is larger than Gaussian (u^2 z^2)
    offset_part = channel_means(n - base)
    expected = s**2 / 3
    assert abs(offset_part.var().item() - expected) < 0.1 * expected
    assert_variance(channel_means(n), 1 / 64 + expected, sigmas=8)


def test_offset_noise_rejects_negative_offset():
    with pytest.raises(ValueError, match="offset"):
        N.offset_noise(torch.zeros(1, 4, 2, 2), -0.1)


# --------------------------------------------------------------------------------- pyramid noise


@pytest.mark.parametrize("iterations,discount", [(1, 0.5), (6, 0.3), (10, 0.8)])
def test_pyramid_noise_unit_std_and_more_low_frequency(iterations, discount):
    x = torch.zeros(256, 4, 64, 64)
    n = N.pyramid_noise(x, iterations, discount, gen(10))
    assert n.shape == x.shape and n.dtype == x.dtype
    torch.testing.assert_close(n.std(dim=(2, 3)), torch.ones(256, 4), rtol=0, atol=1e-5)
    white = 1.0 / (64 * 64)
    # low-frequency energy: the spatial mean varies far more than white noise's 1/(H*W)
    assert channel_means(n).var().item() > 3 * white
    # and neighbouring pixels are correlated (white noise: 0 with sd ~1/sqrt(4M) = 0.0005)
    neighbour_corr = (n[..., :, 1:] * n[..., :, :-1]).mean().item()
    assert neighbour_corr > 0.01


def test_pyramid_noise_stronger_discount_more_low_frequency():
    x = torch.zeros(128, 4, 32, 32)
    weak = channel_means(N.pyramid_noise(x, 6, 0.1, gen(11))).var()
    strong = channel_means(N.pyramid_noise(x, 6, 0.8, gen(11))).var()
    assert strong > 5 * weak


def test_pyramid_noise_uses_base_noise_and_is_reproducible():
    x = torch.zeros(2, 4, 16, 16)
    base = torch.randn(x.shape, generator=gen(12))
    a = N.pyramid_noise(x, 3, 0.4, gen(13), base_noise=base)
    b = N.pyramid_noise(x, 3, 0.4, gen(13), base_noise=base.clone())
    c = N.pyramid_noise(x, 3, 0.4, gen(14), base_noise=base)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # discount 0: the lower levels add nothing, what is left is the base renormalized
    zero = N.pyramid_noise(x, 3, 0.0, gen(13), base_noise=base)
    torch.testing.assert_close(zero, base / base.std(dim=(2, 3), keepdim=True))
    # iterations 0: the base itself
    assert N.pyramid_noise(x, 0, 0.4, gen(13), base_noise=base) is base


def test_pyramid_noise_tiny_and_non_square_latents():
    for shape in [(2, 4, 1, 1), (2, 4, 1, 7), (2, 4, 3, 2), (2, 4, 9, 33)]:
        n = N.pyramid_noise(torch.zeros(shape), 8, 0.5, gen(15))
        assert n.shape == shape and torch.isfinite(n).all()


# ---------------------------------------------------------------------------------- sample_noise


def noise_cfg(**kw):
    defaults = dict(
        offset=0.0, adaptive_offset=0.0, offset_random_strength=False, pyramid_iterations=0, pyramid_discount=0.3
    )
    return SimpleNamespace(**{**defaults, **kw})


def test_sample_noise_composes_pyramid_then_offset():
    x = torch.randn(3, 4, 16, 16)
    cfg = noise_cfg(
        offset=0.1, adaptive_offset=0.02, offset_random_strength=True, pyramid_iterations=4, pyramid_discount=0.5
    )
    got = N.sample_noise(x, cfg, gen(16))
    g = gen(16)
    base = torch.randn(x.shape, generator=g)
    pyramid = N.pyramid_noise(x, 4, 0.5, g, base_noise=base)
    expected = N.offset_noise(x, 0.1, g, adaptive_offset=0.02, random_strength=True, base_noise=pyramid)
    assert torch.equal(got, expected)


def test_sample_noise_offset_keeps_its_meaning_with_pyramid():
    # pyramid noise has a larger channel-mean variance v_p; the offset adds exactly s^2 on top
    x = torch.zeros(1024, 4, 32, 32)
    pyramid_only = channel_means(N.sample_noise(x, noise_cfg(pyramid_iterations=3, pyramid_discount=0.4), gen(17)))
    both = channel_means(N.sample_noise(x, noise_cfg(offset=0.2, pyramid_iterations=3, pyramid_discount=0.4), gen(17)))
    assert_variance(both, pyramid_only.var().item() + 0.04, sigmas=6)


def test_sample_noise_plain_config_is_plain_noise():
    x = torch.zeros(2, 4, 8, 8)
    assert torch.equal(N.sample_noise(x, noise_cfg(), gen(18)), torch.randn(x.shape, generator=gen(18)))


# ---------------------------------------------------------------------------- input perturbation


def test_perturb_noise_adds_gamma_scaled_independent_noise():
    noise = torch.randn(512, 4, 16, 16, generator=gen(19))
    perturbed = N.perturb_noise(noise, 0.1, gen(20))
    extra = perturbed - noise
    assert abs(extra.std().item() - 0.1) < 0.001
    # independent of the noise: total variance 1 + gamma^2
    assert abs(perturbed.var().item() - 1.01) < 0.005
    torch.testing.assert_close(extra, 0.1 * torch.randn(noise.shape, generator=gen(20)))
    assert N.perturb_noise(noise, 0.0, gen(20)) is noise


# ------------------------------------------------------------------------------------- schedule


def test_sample_timesteps_uniform_and_reproducible():
    t = N.sample_timesteps(100_000, 1000, gen(21))
    assert t.dtype == torch.int64 and t.shape == (100_000,)
    assert t.min() == 0 and t.max() == 999
    counts = torch.bincount(t, minlength=1000).double()
    # chi-square with 999 dof: mean 999, sd ~44.7; 6 sd margin
    chi2 = ((counts - 100.0) ** 2 / 100.0).sum().item()
    assert chi2 < 999 + 6 * math.sqrt(2 * 999)
    assert torch.equal(t, N.sample_timesteps(100_000, 1000, gen(21)))
    assert not torch.equal(t, N.sample_timesteps(100_000, 1000, gen(22)))
    limited = N.sample_timesteps(10_000, 1000, gen(23), min_timestep=200, max_timestep=300)
    assert limited.min() == 200 and limited.max() == 299
    with pytest.raises(ValueError):
        N.sample_timesteps(4, 1000, min_timestep=500, max_timestep=400)


def test_sd1_terminal_signal_is_about_0_068(sd15):
    # SD 1.x never fully destroys the signal: sqrt(alpha_bar_T) ~ 0.068 of the image is left at t = T.
    assert abs(sd15.alphas_cumprod[-1].sqrt().item() - 0.068) < 0.001


def test_zero_terminal_snr_betas(sd15):
    betas = N.zero_terminal_snr_betas(sd15.betas)
    assert betas.dtype == sd15.betas.dtype and betas.shape == sd15.betas.shape
    alphas_cumprod = torch.cumprod(1 - betas.double(), dim=0)
    assert alphas_cumprod[-1].abs().item() < 1e-8
    assert abs(alphas_cumprod[0].item() - sd15.alphas_cumprod[0].item()) < 1e-7
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert ((betas > 0) & (betas <= 1)).all() and betas[-1].item() == 1.0
    # diffusers' implementation: identical in float64, and within float32 rounding of its float32 run
    assert torch.equal(betas, rescale_zero_terminal_snr(sd15.betas.double()).float())
    torch.testing.assert_close(betas, rescale_zero_terminal_snr(sd15.betas.clone()), rtol=1e-4, atol=1e-5)


def test_training_scheduler_zero_terminal_snr(sd15):
    plain = N.training_scheduler(sd15.config)
    assert isinstance(plain, DDPMScheduler)
    torch.testing.assert_close(plain.alphas_cumprod, sd15.alphas_cumprod, rtol=0, atol=0)
    ztsnr = N.training_scheduler(SD15_SCHEDULER_CONFIG, zero_terminal_snr=True, prediction_type="v_prediction")
    assert ztsnr.config.rescale_betas_zero_snr and ztsnr.config.timestep_spacing == "trailing"
    assert ztsnr.config.prediction_type == "v_prediction"
    assert ztsnr.alphas_cumprod[-1].item() == 0.0
    torch.testing.assert_close(ztsnr.betas, N.zero_terminal_snr_betas(sd15.betas), rtol=1e-4, atol=1e-5)
    ztsnr.set_timesteps(50)
    assert ztsnr.timesteps[0].item() == 999  # trailing spacing starts sampling at t = T
    with pytest.raises(ValueError, match="prediction_type"):
        N.training_scheduler(SD15_SCHEDULER_CONFIG, prediction_type="sample_x0")


# ------------------------------------------------------------------------------------ objective


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_noise_and_targets_equal_diffusers(sd15, dtype):
    g = gen(24)
    latents = torch.randn(6, 4, 8, 8, generator=g).to(dtype)
    noise = torch.randn(6, 4, 8, 8, generator=g).to(dtype)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    noisy = N.add_noise(latents, noise, timesteps, sd15.alphas_cumprod)
    assert torch.equal(noisy, sd15.add_noise(latents, noise, timesteps))
    velocity = N.training_target(latents, noise, timesteps, sd15.alphas_cumprod, "v_prediction")
    assert velocity.dtype == dtype
    assert torch.equal(velocity, sd15.get_velocity(latents, noise, timesteps))
    assert N.training_target(latents, noise, timesteps, sd15.alphas_cumprod, "epsilon") is noise
    with pytest.raises(ValueError, match="prediction_type"):
        N.training_target(latents, noise, timesteps, sd15.alphas_cumprod, "sample")


def test_v_target_at_zero_terminal_snr_is_minus_latents():
    ztsnr = N.training_scheduler(SD15_SCHEDULER_CONFIG, zero_terminal_snr=True)
    latents, noise = torch.randn(2, 4, 4, 4, generator=gen(25)), torch.randn(2, 4, 4, 4, generator=gen(26))
    t = torch.tensor([999, 999])
    assert torch.equal(N.add_noise(latents, noise, t, ztsnr.alphas_cumprod), noise)  # pure noise at T
    torch.testing.assert_close(N.training_target(latents, noise, t, ztsnr.alphas_cumprod, "v_prediction"), -latents)


def test_snr_equals_diffusers(sd15):
    t = torch.arange(1000)
    ours = N.snr(sd15.alphas_cumprod, t)
    torch.testing.assert_close(ours, compute_snr(sd15, t), rtol=1e-5, atol=0)
    assert (ours[1:] < ours[:-1]).all()
    ztsnr = N.training_scheduler(SD15_SCHEDULER_CONFIG, zero_terminal_snr=True)
    assert N.snr(ztsnr.alphas_cumprod, torch.tensor([999])).item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_gives_the_same_noise_on_gpu():
    x = torch.randn(2, 4, 16, 16)
    cfg = noise_cfg(offset=0.1, adaptive_offset=0.05, offset_random_strength=True, pyramid_iterations=3)
    on_cpu = N.sample_noise(x, cfg, gen(30))
    on_gpu = N.sample_noise(x.cuda(), cfg, gen(30))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)  # bilinear upsampling may round differently
    steps = N.sample_timesteps(8, 1000, gen(31), device="cuda")
    assert steps.device.type == "cuda" and torch.equal(steps.cpu(), N.sample_timesteps(8, 1000, gen(31)))
    perturbed = N.perturb_noise(on_gpu, 0.1, gen(32))
    assert perturbed.device.type == "cuda"


# ------------------------------------------------------------------------------------ properties

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 12), st.integers(1, 12))
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    dtype=dtypes,
    seed=st.integers(0, 2**31),
    offset=st.floats(0, 1),
    adaptive=st.floats(-1, 1),
    random_strength=st.booleans(),
    iterations=st.integers(0, 8),
    discount=st.floats(0, 1),
)
def test_sample_noise_shapes_dtypes_finite(shape, dtype, seed, offset, adaptive, random_strength, iterations, discount):
    x = (torch.randn(shape, generator=gen(seed)) * 3).to(dtype)
    cfg = noise_cfg(offset=offset, adaptive_offset=adaptive, offset_random_strength=random_strength,
                    pyramid_iterations=iterations, pyramid_discount=discount)
    n = N.sample_noise(x, cfg, gen(seed))
    assert n.shape == x.shape and n.dtype == x.dtype and torch.isfinite(n).all()
    assert torch.equal(n, N.sample_noise(x, cfg, gen(seed)))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    dtype=dtypes,
    prediction_type=st.sampled_from(N.PREDICTION_TYPES),
    ztsnr=st.booleans(),
    gamma=st.floats(0.1, 20),
    seed=st.integers(0, 2**31),
)
def test_objective_finite(batch, dtype, prediction_type, ztsnr, gamma, seed):
    scheduler = N.training_scheduler(SD15_SCHEDULER_CONFIG, zero_terminal_snr=ztsnr)
    g = gen(seed)
    t = N.sample_timesteps(batch, 1000, g)
    t[0] = 999  # always include the terminal step (snr = 0 under zero terminal SNR)
    latents = torch.randn(batch, 4, 4, 4, generator=g).to(dtype)
    noise = torch.randn(batch, 4, 4, 4, generator=g).to(dtype)
    noisy = N.add_noise(latents, noise, t, scheduler.alphas_cumprod)
    target = N.training_target(latents, noise, t, scheduler.alphas_cumprod, prediction_type)
    weights = L.min_snr_weights(N.snr(scheduler.alphas_cumprod, t), gamma, prediction_type)
    loss = L.per_sample_loss(noisy, target) * weights
    assert noisy.dtype == target.dtype == dtype and loss.shape == (batch,)
    assert torch.isfinite(noisy).all() and torch.isfinite(target).all() and torch.isfinite(loss).all()
