"""The loss and its weights: hand computations, the snr = 0 edge, the DreamBooth combination."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lora_offset.tiny import SD15_SCHEDULER_CONFIG
from lora_offset.training import losses as L
from lora_offset.training import noise as N


@pytest.fixture(scope="module")
def sd15():
    return DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)


def test_min_snr_weights_formula_and_snr_zero():
    values = torch.tensor([0.0, 1e-30, 1e-3, 0.5, 1.0, 4.9, 5.0, 5.1, 100.0, 1e6])
    gamma = 5.0
    eps = L.min_snr_weights(values, gamma, "epsilon")
    v = L.min_snr_weights(values, gamma, "v_prediction")
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    positive = values[1:]
    torch.testing.assert_close(eps[1:], torch.minimum(positive, torch.tensor(gamma)) / positive)
    torch.testing.assert_close(v, torch.minimum(values, torch.tensor(gamma)) / (values + 1))
    assert eps[0].item() == 1.0  # the limit snr -> 0, same as every snr < gamma
    assert v[0].item() == 0.0
    assert eps[:6].eq(1.0).all()  # snr <= gamma: weight 1 for epsilon
    torch.testing.assert_close(eps[-1], torch.tensor(gamma / 1e6))


def test_min_snr_weights_on_schedules(sd15):
    t = torch.arange(1000)
    weights = L.min_snr_weights(N.snr(sd15.alphas_cumprod, t), 1e9, "epsilon")
    assert torch.equal(weights, torch.ones(1000))  # gamma above every snr: epsilon weights are all 1
    ztsnr = N.training_scheduler(SD15_SCHEDULER_CONFIG, zero_terminal_snr=True)
    ztsnr_snr = N.snr(ztsnr.alphas_cumprod, t)
    for prediction_type in N.PREDICTION_TYPES:
        w = L.min_snr_weights(ztsnr_snr, 5.0, prediction_type)
        assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    with pytest.raises(ValueError, match="gamma"):
        L.min_snr_weights(ztsnr_snr, 0.0, "epsilon")


def test_per_sample_loss():
    pred = torch.zeros(3, 4, 2, 2)
    target = torch.zeros(3, 4, 2, 2)
    target[1] = 2.0
    target[2, 0] = 4.0  # one of four channels: mean of 16 over 1/4 of the elements
    loss = L.per_sample_loss(pred.half(), target.half())
    assert loss.dtype == torch.float32 and loss.shape == (3,)
    assert loss.tolist() == [0.0, 4.0, 4.0]
    torch.testing.assert_close(loss.mean(), torch.nn.functional.mse_loss(pred, target))
    with pytest.raises(ValueError, match="shape"):
        L.per_sample_loss(pred, target[:2])
