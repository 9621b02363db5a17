"""Which timesteps training sees: noise.timestep_distribution, as pure functions.

Every distribution is a probability for each integer timestep in [min_timestep, max_timestep)
(`probabilities`, float64, shape (T,), zero outside the range) and a sampler that draws from it
(`sample_timesteps`, int64 (B,), from a ``torch.Generator``: a seeded generator repeats every draw).
Timestep 0 is the least noise, T - 1 the most; x below is the position in the range,
(t - min_timestep) / (max_timestep - min_timestep) in [0, 1).

    uniform        every timestep of the range equally (kohya's, and lora-offset's default); drawn with
                   noise.sample_timesteps, so a uniform run draws exactly what it drew before this module
    logit_normal   x = sigmoid(z), z ~ N(logit_mean, logit_std^2) (SD3's logit-normal; OneTrainer's
                   LOGIT_NORMAL with noising_bias = mean, noising_weight + 1 = std): the middle timesteps
                   most, the ends least; a positive mean leans towards the noisy end
    cosmap         density 2 / (pi (1 - 2x + 2x^2)) (SD3's CosMap; OneTrainer's COS_MAP): the middle
                   twice as often as either end
    timestep_bias  SimpleTuner's --timestep_bias_*: every timestep of the schedule weighs 1, those of the
                   biased part weigh `multiplier`: "earlier" = the first int(portion * T) timesteps (the
                   least noisy), "later" = the last int(portion * T), "range" = [begin, end). The weights
                   are over the whole schedule; min/max_timestep then cut the range.

The continuous ones (logit_normal, cosmap) draw x in float64 and take its timestep floor(min + x * n),
so timestep t has exactly the probability of its bin: F(x_{t+1}) - F(x_t) with F the distribution's
CDF. OneTrainer draws CosMap from its density sampled at n points, which is the same up to the bin's
curvature; SimpleTuner's segmented draw across the batch (one timestep from each part of the schedule)
is not done: every sample of a batch is drawn independently.

The loss weights (min-SNR, debiased estimation: losses.loss_weights) are computed per sample from the
timesteps actually drawn, so under any distribution p the expected loss weighs timestep t by
p(t) * w(t): the distribution and the weighting multiply (tests/test_timesteps.py pins that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lora_offset.training import noise

DISTRIBUTIONS = ("uniform", "logit_normal", "cosmap", "timestep_bias")
BIAS_STRATEGIES = ("earlier", "later", "range")


@dataclass(frozen=True)
class TimestepDistribution:
    """A distribution and its parameters (the noise.* keys of the same names; unused ones are ignored)."""

    name: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    bias_strategy: str = "later"
    bias_multiplier: float = 1.0
    bias_portion: float = 0.25
    bias_begin: int = 0
    bias_end: int = 1000

    @classmethod
    def from_config(cls, noise_cfg) -> "TimestepDistribution":
        """From a [noise] config (duck-typed; missing attributes take the defaults)."""
        d = cls()
        return cls(
            name=getattr(noise_cfg, "timestep_distribution", d.name),
            logit_mean=float(getattr(noise_cfg, "logit_mean", d.logit_mean)),
            logit_std=float(getattr(noise_cfg, "logit_std", d.logit_std)),
            bias_strategy=getattr(noise_cfg, "timestep_bias_strategy", d.bias_strategy),
            bias_multiplier=float(getattr(noise_cfg, "timestep_bias_multiplier", d.bias_multiplier)),
            bias_portion=float(getattr(noise_cfg, "timestep_bias_portion", d.bias_portion)),
            bias_begin=int(getattr(noise_cfg, "timestep_bias_begin", d.bias_begin)),
            bias_end=int(getattr(noise_cfg, "timestep_bias_end", d.bias_end)),
        )

    def check(self, num_train_timesteps: int) -> None:
        """ValueError for parameters that define no distribution."""
        if self.name not in DISTRIBUTIONS:
            raise ValueError(f"timestep distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.name!r}")
        if self.name == "logit_normal" and not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.name == "timestep_bias":
            if self.bias_strategy not in BIAS_STRATEGIES:
                raise ValueError(f"bias strategy must be one of {', '.join(BIAS_STRATEGIES)}, got {self.bias_strategy!r}")
            if not self.bias_multiplier > 0:
                raise ValueError(f"bias multiplier must be > 0, got {self.bias_multiplier}")
            if self.bias_strategy == "range":
                if not 0 <= self.bias_begin < self.bias_end <= num_train_timesteps:
                    raise ValueError(f"bias range needs 0 <= begin < end <= {num_train_timesteps}, "
                                     f"got [{self.bias_begin}, {self.bias_end})")
            elif not 0 < self.bias_portion <= 1 or int(self.bias_portion * num_train_timesteps) < 1:
                raise ValueError(f"bias portion must be in (0, 1] and cover at least one timestep, got {self.bias_portion}")


def _range(num_train_timesteps: int, min_timestep: int, max_timestep: int | None) -> tuple[int, int]:
    high = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < high <= num_train_timesteps:
        raise ValueError(f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps}, got [{min_timestep}, {high})")
    return min_timestep, high


def _logit_normal_cdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    # P(sigmoid(z) <= x) = Phi((logit(x) - mean) / std); logit(0) = -inf and logit(1) = inf give 0 and 1.
    return torch.special.ndtr((torch.logit(x) - mean) / std)


def _cosmap_cdf(x: torch.Tensor) -> torch.Tensor:
    # The integral of 2 / (pi (1 - 2x + 2x^2)) from 0: 1/2 + (2/pi) atan(2x - 1).
    return 0.5 + (2 / math.pi) * torch.atan(2 * x - 1)


def _bias_weights(dist: TimestepDistribution, num_train_timesteps: int) -> torch.Tensor:
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    biased = int(dist.bias_portion * num_train_timesteps)
    part = {"earlier": slice(0, biased), "later": slice(num_train_timesteps - biased, num_train_timesteps),
            "range": slice(dist.bias_begin, dist.bias_end)}[dist.bias_strategy]
    weights[part] *= dist.bias_multiplier
    return weights


def probabilities(dist: TimestepDistribution, num_train_timesteps: int, min_timestep: int = 0,
                  max_timestep: int | None = None) -> torch.Tensor:
    """P(t) for t = 0 .. T-1 (float64, sums to 1, zero outside [min_timestep, max_timestep))."""
    dist.check(num_train_timesteps)
    low, high = _range(num_train_timesteps, min_timestep, max_timestep)
    probs = torch.zeros(num_train_timesteps, dtype=torch.float64)
    edges = torch.arange(high - low + 1, dtype=torch.float64) / (high - low)  # bin edges in x
    if dist.name == "uniform":
        probs[low:high] = 1.0 / (high - low)
    elif dist.name == "logit_normal":
        probs[low:high] = torch.diff(_logit_normal_cdf(edges, dist.logit_mean, dist.logit_std))
    elif dist.name == "cosmap":
        probs[low:high] = torch.diff(_cosmap_cdf(edges))
    else:
        weights = _bias_weights(dist, num_train_timesteps)[low:high]
        probs[low:high] = weights / weights.sum()
    return probs


def sample_timesteps(dist: TimestepDistribution, batch_size: int, num_train_timesteps: int,
                     generator: torch.Generator | None = None, *, min_timestep: int = 0,
                     max_timestep: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 timesteps of shape (batch_size,) drawn from `dist` on [min_timestep, max_timestep).

    Draws on the generator's device (a CPU generator gives the same timesteps for any training
    device), then moves them to `device`.
    """
    if dist.name == "uniform":  # the draw of every run before timestep distributions existed
        return noise.sample_timesteps(batch_size, num_train_timesteps, generator, min_timestep=min_timestep,
                                      max_timestep=max_timestep, device=device)
    dist.check(num_train_timesteps)
    low, high = _range(num_train_timesteps, min_timestep, max_timestep)
    draw_device = device if generator is None else generator.device
    if dist.name == "timestep_bias":
        probs = probabilities(dist, num_train_timesteps, low, high).to(draw_device)
        timesteps = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return timesteps.to(device)
    if dist.name == "logit_normal":
        z = torch.randn(batch_size, generator=generator, dtype=torch.float64, device=draw_device)
        x = torch.sigmoid(dist.logit_mean + dist.logit_std * z)
    else:  # cosmap, by its inverse CDF
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=draw_device)
        x = (1 + torch.tan(math.pi / 2 * (u - 0.5))) / 2
    # x can reach 1.0 in floating point (a sigmoid of a large z): that draw belongs to the last timestep.
    timesteps = (low + torch.floor(x * (high - low))).long().clamp(low, high - 1)
    return timesteps.to(device)


__all__ = ["BIAS_STRATEGIES", "DISTRIBUTIONS", "TimestepDistribution", "probabilities", "sample_timesteps"]
