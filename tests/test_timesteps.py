"""Timestep distributions: each histogram over 100 k draws fits its density, computed here independently
(scipy integrates each density over each timestep's bin; the bias weights are written out by hand), and
the loss weights stay the per-sample min-SNR / debiased weights of the timesteps drawn.

The goodness-of-fit bound: Pearson's chi-square over the timesteps (bins whose expected count is below 5
pooled into one) must stay below the chi-square quantile 1 - 1e-9 for its degrees of freedom. Draws come
from fixed seeds, so each run repeats the same numbers; were the seeds free, a correct sampler would still
fail one such check in a billion runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from lora_offset.tiny import SD15_SCHEDULER_CONFIG
from lora_offset.training import losses as L
from lora_offset.training import noise as N
from lora_offset.training.timesteps import TimestepDistribution, probabilities, sample_timesteps

DRAWS = 100_000
T = 1000
FALSE_FAILURE = 1e-9


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bin_integrals(density, low: int, high: int) -> np.ndarray:
    """P(t) for t in [low, high): the density of x = (t - low) / n integrated over each timestep's bin."""
    n = high - low
    probs = np.zeros(T)
    for k in range(n):
        probs[low + k] = integrate.quad(density, k / n, (k + 1) / n, epsabs=1e-14, epsrel=1e-10)[0]
    return probs


def logit_normal_density(mean: float, std: float):
    def density(x: float) -> float:
        if x <= 0 or x >= 1:
            return 0.0
        z = (math.log(x / (1 - x)) - mean) / std
        return math.exp(-0.5 * z * z) / (std * math.sqrt(2 * math.pi) * x * (1 - x))
    return density


def cosmap_density(x: float) -> float:
    return 2 / (math.pi * (1 - 2 * x + 2 * x * x))


def chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> tuple[float, float]:
    """(Pearson's statistic, its 1 - FALSE_FAILURE quantile) with small-expectation bins pooled."""
    expected = expected_probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        assert obs[-1] == 0, "draws where the density is zero"
        obs, exp = obs[:-1], exp[:-1]
    statistic = float(((obs - exp) ** 2 / exp).sum())
    return statistic, float(stats.chi2.ppf(1 - FALSE_FAILURE, len(exp) - 1))


def by_hand_bias(strategy: str, multiplier: float, portion: float = 0.25, begin: int = 0, end: int = T,
                 low: int = 0, high: int = T) -> np.ndarray:
    weights = np.ones(T)
    biased = int(portion * T)
    if strategy == "earlier":
        weights[:biased] = multiplier
    elif strategy == "later":
        weights[T - biased:] = multiplier
    else:
        weights[begin:end] = multiplier
    weights[:low] = 0
    weights[high:] = 0
    return weights / weights.sum()


CASES = [  # (distribution, min_timestep, max_timestep, the expected P(t), computed independently)
    (TimestepDistribution("uniform"), 0, T, np.full(T, 1 / T)),
    (TimestepDistribution("uniform"), 200, 700, np.r_[np.zeros(200), np.full(500, 1 / 500), np.zeros(300)]),
    (TimestepDistribution("logit_normal"), 0, T, None),
    (TimestepDistribution("logit_normal", logit_mean=0.8, logit_std=0.6), 0, T, None),
    (TimestepDistribution("logit_normal", logit_mean=-0.5, logit_std=1.5), 100, 900, None),
    (TimestepDistribution("cosmap"), 0, T, None),
    (TimestepDistribution("cosmap"), 300, 1000, None),
    (TimestepDistribution("timestep_bias", bias_strategy="later", bias_multiplier=3.0), 0, T, None),
    (TimestepDistribution("timestep_bias", bias_strategy="earlier", bias_multiplier=0.5, bias_portion=0.4), 0, T, None),
    (TimestepDistribution("timestep_bias", bias_strategy="range", bias_multiplier=5.0, bias_begin=200, bias_end=500),
     0, T, None),
    (TimestepDistribution("timestep_bias", bias_strategy="later", bias_multiplier=2.0), 100, 800, None),
]


def expected_probs(dist: TimestepDistribution, low: int, high: int, given) -> np.ndarray:
    if given is not None:
        return given
    if dist.name == "logit_normal":
        return bin_integrals(logit_normal_density(dist.logit_mean, dist.logit_std), low, high)
    if dist.name == "cosmap":
        return bin_integrals(cosmap_density, low, high)
    return by_hand_bias(dist.bias_strategy, dist.bias_multiplier, dist.bias_portion, dist.bias_begin, dist.bias_end,
                        low, high)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_each_distribution_histogram_fits_its_density_over_100k_draws(index):
    dist, low, high, given = CASES[index]
    expected = expected_probs(dist, low, high, given)
    assert expected.sum() == pytest.approx(1.0, abs=1e-9)
    # The module's own P(t) is the density too (to float precision): it is what the docs and tests rely on.
    np.testing.assert_allclose(probabilities(dist, T, low, high).numpy(), expected, rtol=1e-7, atol=1e-12)
    drawn = sample_timesteps(dist, DRAWS, T, gen(1000 + index), min_timestep=low, max_timestep=high)
    assert drawn.dtype == torch.int64 and drawn.shape == (DRAWS,)
    assert drawn.min() >= low and drawn.max() < high
    counts = np.bincount(drawn.numpy(), minlength=T).astype(np.float64)
    statistic, bound = chi_square(counts, expected)
    assert statistic < bound, f"{dist}: chi-square {statistic:.1f} >= {bound:.1f}"
    # The check has power: the same draws against the uniform density of the range fail it (except uniform's own).
    if dist.name != "uniform":
        flat = np.zeros(T)
        flat[low:high] = 1 / (high - low)
        assert chi_square(counts, flat)[0] > 2 * bound


def test_cosmap_draws_the_middle_twice_as_often_as_the_ends():
    p = probabilities(TimestepDistribution("cosmap"), T)
    assert float(p[499] / p[0]) == pytest.approx(2.0, rel=0.01) and float(p[500] / p[999]) == pytest.approx(2.0, rel=0.01)


def test_draws_repeat_with_the_seed_and_uniform_draws_what_it_always_drew():
    for dist in (TimestepDistribution("logit_normal"), TimestepDistribution("cosmap"),
                 TimestepDistribution("timestep_bias", bias_multiplier=2.0)):
        a = sample_timesteps(dist, 64, T, gen(5))
        assert torch.equal(a, sample_timesteps(dist, 64, T, gen(5)))
        assert not torch.equal(a, sample_timesteps(dist, 64, T, gen(6)))
    assert torch.equal(sample_timesteps(TimestepDistribution(), 64, T, gen(7), min_timestep=3, max_timestep=900),
                       N.sample_timesteps(64, T, gen(7), min_timestep=3, max_timestep=900))


def test_a_logit_normal_draw_at_the_end_of_the_range_is_its_last_timestep():
    """sigmoid(z) rounds to 1.0 for a large z: that draw is timestep max - 1, never max."""
    dist = TimestepDistribution("logit_normal", logit_mean=60.0, logit_std=1.0)
    drawn = sample_timesteps(dist, 100, T, gen(0), max_timestep=500)
    assert drawn.max() == 499 and drawn.min() == 499


def test_the_distribution_parameters_are_checked():
    for dist, match in [
        (TimestepDistribution("gauss"), "one of uniform, logit_normal, cosmap, timestep_bias"),
        (TimestepDistribution("logit_normal", logit_std=0.0), "logit_std must be > 0"),
        (TimestepDistribution("timestep_bias", bias_strategy="middle"), "one of earlier, later, range"),
        (TimestepDistribution("timestep_bias", bias_multiplier=0.0), "multiplier must be > 0"),
        (TimestepDistribution("timestep_bias", bias_portion=0.0), r"portion must be in \(0, 1\]"),
        (TimestepDistribution("timestep_bias", bias_strategy="range", bias_begin=500, bias_end=500), "begin < end"),
    ]:
        with pytest.raises(ValueError, match=match):
            sample_timesteps(dist, 4, T, gen(0))


@pytest.fixture(scope="module")
def ztsnr_alphas_cumprod():
    scheduler = N.training_scheduler(SD15_SCHEDULER_CONFIG, zero_terminal_snr=True)
    return scheduler.alphas_cumprod


@pytest.mark.parametrize("name, extra", [("uniform", {}), ("logit_normal", {"logit_mean": 1.0}), ("cosmap", {}),
                                         ("timestep_bias", {"bias_multiplier": 4.0})])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_and_debiased_weights_under_each_distribution(name, extra, prediction_type, ztsnr_alphas_cumprod):
    """The weights are the per-sample formulas at the drawn timesteps, finite even at t = T - 1 where zero
    terminal SNR makes snr = 0, and the mean weighted loss over the draws is sum_t p(t) w(t) loss(t)."""
    ab = ztsnr_alphas_cumprod
    dist = TimestepDistribution(name, **extra)
    drawn = sample_timesteps(dist, DRAWS, T, gen(99))
    forced = torch.cat([drawn[:1000], torch.tensor([T - 1])])  # with the snr = 0 timestep among them
    snr = (ab[forced] / (1 - ab[forced])).double()
    gamma = 5.0
    weights = L.loss_weights(gamma, True, ab, forced, prediction_type).double()
    assert torch.isfinite(weights).all()
    # The formulas, written out here: min-SNR then kohya's debiased weight, snr capped at 1000 and floored at 1e-4.
    capped = snr.clamp(max=1000)
    if prediction_type == "epsilon":
        min_snr = torch.where(snr > 0, snr.clamp(max=gamma) / snr.clamp(min=1e-300), torch.ones_like(snr))
        debiased = 1 / capped.clamp(min=1e-4).sqrt()
    else:
        min_snr, debiased = snr.clamp(max=gamma) / (snr + 1), 1 / (capped + 1)
    torch.testing.assert_close(weights, min_snr * debiased, rtol=1e-5, atol=1e-6)
    # E[w(t) loss(t)] over the draws -> sum_t p(t) w(t) loss(t), for a loss that varies with t.
    all_t = torch.arange(T)
    loss_of_t = 1 + torch.cos(all_t.double() / 150)
    w_all = L.loss_weights(gamma, True, ab, all_t, prediction_type).double()
    exact = float((probabilities(dist, T) * w_all * loss_of_t).sum())
    values = L.loss_weights(gamma, True, ab, drawn, prediction_type).double() * loss_of_t[drawn]
    spread = float(values.std()) / math.sqrt(DRAWS)
    assert abs(float(values.mean()) - exact) < 6.5 * spread  # 6.5 standard errors: ~1e-10 two-sided


# ----------------------------------------------------------------------------- in a training run, and the config

def test_a_run_draws_its_timesteps_from_the_configured_distribution(tmp_path, tiny_model_dir, monkeypatch):
    """timestep_bias on [100, 110) at x1000 (with min_timestep 50): nearly every timestep falls there; the
    adapter records the distribution."""
    from safetensors import safe_open

    from lora_offset.cli import main
    from lora_offset.training import step as step_module
    from tests.test_train import make_images, write_config

    drawn = []
    real = step_module.sample_timesteps

    def recording(dist, *args, **kwargs):
        timesteps = real(dist, *args, **kwargs)
        drawn.append((dist, timesteps.clone()))
        return timesteps

    monkeypatch.setattr(step_module, "sample_timesteps", recording)
    images = make_images(tmp_path / "data" / "1_sks dog", 2)
    config = write_config(tmp_path, tiny_model_dir, images, training={"max_steps": 4}, noise={
        "timestep_distribution": "timestep_bias", "timestep_bias_strategy": "range", "timestep_bias_multiplier": 1000.0,
        "timestep_bias_begin": 100, "timestep_bias_end": 110, "min_timestep": 50, "min_snr_gamma": 5.0})
    assert main(["train", "--config", str(config)]) == 0
    timesteps = torch.cat([t for _, t in drawn])
    assert len(timesteps) == 4 * 2 and all(d.name == "timestep_bias" and d.bias_begin == 100 for d, _ in drawn)
    # A draw falls outside [100, 110) with probability 940 / (940 + 10 * 1000) = 0.086; the seed is fixed (the
    # same 8 draws every run), and were it free, 4 or more of 8 outside would happen with probability 0.003.
    assert timesteps.min() >= 50 and ((timesteps >= 100) & (timesteps < 110)).sum() >= 5
    with safe_open(str(tmp_path / "out" / "tiny.safetensors"), "pt") as f:
        assert f.metadata()["lora_offset.timestep_distribution"] == (
            '{"name": "timestep_bias", "timestep_bias_strategy": "range", "timestep_bias_multiplier": 1000.0, '
            '"timestep_bias_begin": 100, "timestep_bias_end": 110}')


def noise_config(**noise):
    from lora_offset.config import Config

    return Config.from_dict({"model": {"pretrained": "x"}, "noise": noise, "dataset": {"subsets": [{"image_dir": "a"}]}})


@pytest.mark.parametrize("noise, message", [
    ({"timestep_distribution": "normal"},
     "noise.timestep_distribution must be one of 'uniform' | 'logit_normal' | 'cosmap' | 'timestep_bias', got 'normal'"),
    ({"timestep_distribution": "logit_normal", "logit_std": 0.0}, "noise.logit_std must be > 0, got 0.0"),
    ({"logit_mean": 0.5}, 'noise.logit_mean shapes noise.timestep_distribution = "logit_normal"; it does nothing '
                          'with "uniform": remove it or set timestep_distribution = "logit_normal"'),
    ({"timestep_distribution": "cosmap", "timestep_bias_multiplier": 2.0},
     'noise.timestep_bias_multiplier shapes noise.timestep_distribution = "timestep_bias"; it does nothing with "cosmap"'),
    ({"timestep_distribution": "timestep_bias"}, "with noise.timestep_bias_multiplier = 1.0 is uniform: set a multiplier"),
    ({"timestep_distribution": "timestep_bias", "timestep_bias_multiplier": -1.0},
     "noise.timestep_bias_multiplier must be > 0"),
    ({"timestep_distribution": "timestep_bias", "timestep_bias_multiplier": 2.0, "timestep_bias_portion": 0.0},
     r"noise.timestep_bias_portion must be in \[0.001, 1\]"),
    ({"timestep_distribution": "timestep_bias", "timestep_bias_multiplier": 2.0, "timestep_bias_strategy": "range",
      "timestep_bias_begin": 600, "timestep_bias_end": 500}, r"must satisfy 0 <= begin < end <= 1000"),
    ({"timestep_distribution": "timestep_bias", "timestep_bias_multiplier": 2.0, "timestep_bias_end": 500},
     r'noise.timestep_bias_end does nothing with noise.timestep_bias_strategy = "later" \(earlier / later take '
     r'timestep_bias_portion\)'),
    ({"timestep_distribution": "timestep_bias", "timestep_bias_multiplier": 2.0, "timestep_bias_strategy": "range",
      "timestep_bias_portion": 0.5}, r"noise.timestep_bias_portion does nothing with noise.timestep_bias_strategy = "
                                     r'"range" \(range takes timestep_bias_begin and _end\)'),
])
def test_bad_timestep_settings_are_one_error_naming_the_key(noise, message):
    from lora_offset.errors import UserError

    with pytest.raises(UserError, match=message):
        noise_config(**noise)
