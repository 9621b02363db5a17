"""The loss and its weights: hand computations, the snr = 0 edge, the DreamBooth combination."""

from __future__ import annotations

import math

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


# ---- loss types: each against a hand computation ---------------------------------------------


def two_samples():
    """pred 0; sample 0 misses by (3, -4), sample 1 by (0.1, 0.2): one far, one near."""
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[3.0, -4.0]]], [[[0.1, 0.2]]]])
    return pred, target


def test_l2_and_l1_by_hand():
    pred, target = two_samples()
    torch.testing.assert_close(L.per_sample_loss(pred, target, "l2"), torch.tensor([(9 + 16) / 2, (0.01 + 0.04) / 2]))
    torch.testing.assert_close(L.per_sample_loss(pred, target, "l1"), torch.tensor([(3 + 4) / 2, (0.1 + 0.2) / 2]))


def test_huber_and_smooth_l1_by_hand():
    pred, target = two_samples()
    c = torch.tensor([0.5, 0.25])
    huber = L.per_sample_loss(pred, target, "huber", c)
    smooth = L.per_sample_loss(pred, target, "smooth_l1", c)
    # 2c(sqrt(d^2 + c^2) - c) and 2(sqrt(d^2 + c^2) - c), per element, then the mean per sample.
    expected_huber = [(2 * 0.5 * (math.sqrt(9.25) - 0.5) + 2 * 0.5 * (math.sqrt(16.25) - 0.5)) / 2,
                      (2 * 0.25 * (math.sqrt(0.01 + 0.0625) - 0.25) + 2 * 0.25 * (math.sqrt(0.04 + 0.0625) - 0.25)) / 2]
    torch.testing.assert_close(huber, torch.tensor(expected_huber))
    torch.testing.assert_close(smooth, huber / c)  # smooth_l1 is huber without the factor c


def test_huber_is_l2_near_zero_and_linear_far_out():
    c = torch.tensor([1.0])
    near = L.per_sample_loss(torch.zeros(1, 1), torch.tensor([[0.05]]), "huber", c)
    far = L.per_sample_loss(torch.zeros(1, 1), torch.tensor([[1e3]]), "huber", c)
    torch.testing.assert_close(near, torch.tensor([0.0025]), rtol=1e-2, atol=0)  # ~ d^2
    torch.testing.assert_close(far, torch.tensor([2e3 - 2]), rtol=1e-6, atol=0)  # ~ 2c|d| - 2c^2


def test_huber_needs_a_threshold_and_unknown_types_are_refused():
    pred, target = two_samples()
    with pytest.raises(ValueError, match="huber_c"):
        L.per_sample_loss(pred, target, "huber")
    with pytest.raises(ValueError, match="loss_type"):
        L.per_sample_loss(pred, target, "l3")


def test_huber_schedules(sd15):
    t = torch.tensor([0, 250, 500, 999])
    constant = L.huber_threshold("constant", 0.1, t, sd15.alphas_cumprod, 1000)
    assert constant.tolist() == pytest.approx([0.1] * 4)
    exponential = L.huber_threshold("exponential", 0.1, torch.tensor([0, 500, 1000]), sd15.alphas_cumprod, 1000)
    torch.testing.assert_close(exponential, torch.tensor([1.0, math.sqrt(0.1), 0.1]))  # 1 -> huber_c at T
    snr_c = L.huber_threshold("snr", 0.1, t, sd15.alphas_cumprod, 1000)
    ab = sd15.alphas_cumprod[t].double()
    sigma = ((1 - ab) / ab).sqrt()
    torch.testing.assert_close(snr_c, ((1 - 0.1) / (1 + sigma) ** 2 + 0.1).float())
    assert (snr_c[1:] < snr_c[:-1]).all() and snr_c[0] < 1 and (snr_c > 0.1).all()
    # Zero terminal SNR: alpha_bar_T = 0, sigma = inf, the threshold is huber_c itself (finite).
    ztsnr = N.training_scheduler(SD15_SCHEDULER_CONFIG, zero_terminal_snr=True)
    last = L.huber_threshold("snr", 0.1, torch.tensor([999]), ztsnr.alphas_cumprod, 1000)
    assert last.item() == pytest.approx(0.1)


# ---- weights: debiased estimation, combined with min-SNR --------------------------------------


def test_debiased_weights_are_kohyas(sd15):
    t = torch.tensor([0, 100, 500, 999])
    values = N.snr(sd15.alphas_cumprod, t)
    eps = L.debiased_weights(values, "epsilon")
    v = L.debiased_weights(values, "v_prediction")
    capped = values.clamp(max=1000)
    assert values[0] > 1000  # t = 0 is above kohya's cap
    torch.testing.assert_close(eps, 1 / capped.sqrt())
    torch.testing.assert_close(v, 1 / (capped + 1))
    assert eps[0].item() == pytest.approx(1 / math.sqrt(1000))
    ztsnr = N.training_scheduler(SD15_SCHEDULER_CONFIG, zero_terminal_snr=True)
    zero = N.snr(ztsnr.alphas_cumprod, torch.tensor([999]))
    assert L.debiased_weights(zero, "v_prediction").item() == 1.0
    assert L.debiased_weights(zero, "epsilon").item() == pytest.approx(100.0)  # floored, not infinite


def test_loss_weights_combine_min_snr_and_debiased(sd15):
    t = torch.tensor([10, 300, 700])
    ac = sd15.alphas_cumprod
    values = N.snr(ac, t)
    assert L.loss_weights(0.0, False, ac, t, "epsilon") is None
    torch.testing.assert_close(L.loss_weights(5.0, False, ac, t, "epsilon"), L.min_snr_weights(values, 5.0, "epsilon"))
    torch.testing.assert_close(L.loss_weights(0.0, True, ac, t, "epsilon"), L.debiased_weights(values, "epsilon"))
    product = L.min_snr_weights(values, 5.0, "v_prediction") * L.debiased_weights(values, "v_prediction")
    torch.testing.assert_close(L.loss_weights(5.0, True, ac, t, "v_prediction"), product)


def test_dreambooth_loss_by_hand():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_reg = torch.tensor([False, False, True, True])
    assert L.dreambooth_loss(per_sample, is_reg, 0.5).item() == pytest.approx(2.0 + 0.5 * 15.0)
    weights = torch.tensor([1.0, 0.0, 0.5, 0.5])
    assert L.dreambooth_loss(per_sample, is_reg, 1.0, weights).item() == pytest.approx(0.5 + 7.5)
    assert L.dreambooth_loss(per_sample[:2], is_reg[:2], 0.5).item() == pytest.approx(2.0)  # no class samples


# ---- masked loss (kohya's alpha_mask / masked_loss) ------------------------------------------------

def test_masked_mean_by_hand():
    elementwise = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)  # (B, C, H, W)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.5]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (B, 1, H, W)
    got = L.masked_mean(elementwise, mask)
    # sample 0: channel 0 values 0 1 2 3, channel 1 values 4 5 6 7; weights 1 0 0 0.5 in each channel
    expected0 = (0 * 1 + 3 * 0.5 + 4 * 1 + 7 * 0.5) / (2 * 1.5)
    assert got[0].item() == pytest.approx(expected0)
    assert got[1].item() == 0.0  # nothing counts: no loss, no NaN
    torch.testing.assert_close(L.masked_mean(elementwise, torch.ones(2, 1, 2, 2)), elementwise.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(L.masked_mean(elementwise, None), elementwise.mean(dim=(1, 2, 3)))
    # normalised by the area: a small subject weighs as much as a large one with the same error
    small = torch.zeros(1, 1, 2, 2)
    small[..., 0, 0] = 1
    assert L.masked_mean(torch.full((1, 4, 2, 2), 3.0), small).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="expected \\(B, 1, H, W\\)"):
        L.masked_mean(elementwise, torch.ones(2, 2, 2, 2))


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_masked_loss_ignores_the_masked_out_region(loss_type):
    """The gradient reaching the prediction is exactly 0 where the mask is 0, and the loss does not move
    when prediction or target change there; where the mask is 1 it is the unmasked loss of that region."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(3, 4, 8, 8, generator=g)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1.0
    c = torch.full((3,), 0.3)
    loss = L.per_sample_loss(pred, target, loss_type, c, mask=mask).sum()
    loss.backward()
    outside = (mask == 0).expand_as(pred)
    assert torch.count_nonzero(pred.grad[outside]) == 0
    assert torch.count_nonzero(pred.grad[~outside]) == (~outside).sum()
    changed = target.clone()
    changed[outside] += 10 * torch.randn(int(outside.sum()), generator=g)
    again = L.per_sample_loss(pred.detach(), changed, loss_type, c, mask=mask)
    torch.testing.assert_close(again, L.per_sample_loss(pred.detach(), target, loss_type, c, mask=mask))
    region = L.per_sample_loss(pred.detach()[:, :, 2:6, 1:5], target[:, :, 2:6, 1:5], loss_type, c)
    torch.testing.assert_close(again, region)
