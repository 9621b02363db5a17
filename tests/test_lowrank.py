"""The pure low-rank math: SVD from factors, truncation (Eckart–Young), kohya's dynamic rank rules."""

from __future__ import annotations

import math

import pytest
import torch

from lora_offset import lowrank


def random_factors(out_features, in_shape, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, *in_shape, generator=g, dtype=torch.float64)
    up = torch.randn(out_features, rank, *([1, 1] if len(in_shape) == 3 else []), generator=g, dtype=torch.float64)
    return down, up


@pytest.mark.parametrize("out_features, in_shape, rank", [(40, (30,), 6), (24, (8, 3, 3), 5), (3, (50,), 7), (9, (4, 1, 1), 4)])
def test_factored_svd_is_the_svd_of_the_product(out_features, in_shape, rank):
    down, up = random_factors(out_features, in_shape, rank)
    product = up.reshape(out_features, -1) @ down.reshape(rank, -1)
    u, s, vh = lowrank.factored_svd(up, down)
    expected = torch.linalg.svdvals(product)
    assert s.shape[0] == min(out_features, product.shape[1], rank)
    torch.testing.assert_close(s, expected[: s.shape[0]], rtol=1e-10, atol=1e-10)
    assert all(float(v) < 1e-9 for v in expected[s.shape[0]:])  # the rest is zero
    torch.testing.assert_close(u @ torch.diag(s) @ vh, product, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(s.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(vh @ vh.T, torch.eye(s.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 5, 9])
def test_truncation_is_the_eckart_young_optimum(rank):
    g = torch.Generator().manual_seed(rank)
    matrix = torch.randn(12, 9, generator=g, dtype=torch.float64)
    u, s, vh = lowrank.dense_svd(matrix)
    up, down = lowrank.truncate(u, s, vh, rank)
    assert up.shape == (12, min(rank, 9)) and down.shape == (min(rank, 9), 9)
    error = torch.linalg.matrix_norm(matrix - up @ down)
    assert math.isclose(float(error), lowrank.dropped_norm(s, rank), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(lowrank.frobenius_kept(s, rank) ** 2 + (float(error) / float(torch.linalg.matrix_norm(matrix))) ** 2,
                        1.0, rel_tol=1e-9)
    # No other rank-k matrix does better (random competitors, and the truncation nudged).
    for trial in range(20):
        a = torch.randn(12, min(rank, 9), generator=g, dtype=torch.float64)
        b = torch.randn(min(rank, 9), 9, generator=g, dtype=torch.float64)
        assert torch.linalg.matrix_norm(matrix - a @ b) >= error
        assert torch.linalg.matrix_norm(matrix - (up + 1e-3 * a) @ down) >= error


def test_lora_delta_shapes_and_scale():
    down, up = random_factors(6, (4, 3, 3), 2)
    delta = lowrank.lora_delta(down, up, 0.5)
    assert delta.shape == (6, 4, 3, 3) and delta.dtype == torch.float32
    torch.testing.assert_close(delta.double().reshape(6, -1), 0.5 * up.reshape(6, 2) @ down.reshape(2, -1), rtol=1e-6, atol=1e-6)


# kohya's rules (networks/resize_lora.py index_sv_* and rank_resize): count c, clamp c to [1, n-1], rank c + 1.
SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0]  # n = 8; sum 15.5; squares 64, 16, 4, 1, 0.25 (sum 85.25)


@pytest.mark.parametrize("method, param, expected", [
    ("sv_ratio", 3.0, 3),        # s > 8/3: {8, 4}: c = 2
    ("sv_ratio", 4.0, 3),        # s > 2 (strictly): {8, 4}: c = 2
    ("sv_ratio", 5.0, 4),        # s > 1.6: {8, 4, 2}: c = 3
    ("sv_ratio", 100.0, 6),      # s > 0.08: five values: c = 5
    ("sv_cumulative", 0.5, 2),   # cumulative 0.516 >= 0.5 at the first value: c = 1
    ("sv_cumulative", 0.8, 4),   # 0.516, 0.774, 0.903: c = 3
    ("sv_cumulative", 0.95, 5),  # ..., 0.968: c = 4
    ("sv_fro", 0.5, 2),          # squares' share 0.751 >= 0.25: c = 1
    ("sv_fro", 0.9, 3),          # 0.751, 0.938 >= 0.81: c = 2
    ("sv_fro", 0.99, 4),         # ..., 0.985 >= 0.9801: c = 3
])
def test_dynamic_rank_follows_kohyas_definitions(method, param, expected):
    assert lowrank.dynamic_rank(SPECTRUM, method, param, max_rank=64) == expected
    assert lowrank.dynamic_rank(torch.tensor(SPECTRUM), method, param, max_rank=2) == min(expected, 2)


def test_dynamic_rank_clamps_and_zero_spectrum():
    assert lowrank.dynamic_rank([1.0, 1.0, 1.0], "sv_ratio", 2.0, 64) == 3  # c = 3 clamped to n - 1 = 2
    assert lowrank.dynamic_rank([3.0, 1.0], "sv_ratio", 10.0, 64) == 2       # c = 2 clamped to 1
    assert lowrank.dynamic_rank([5.0], "sv_fro", 0.9, 64) == 2               # n = 1: c clamped to 1, rank 2
    assert lowrank.dynamic_rank([1e-7, 0.0, 0.0], "sv_fro", 0.9, 64) == 1    # a zero matrix
    with pytest.raises(ValueError, match="unknown dynamic method"):
        lowrank.dynamic_rank(SPECTRUM, "sv_max", 1.0, 4)


def test_frobenius_kept():
    assert lowrank.frobenius_kept(torch.tensor([3.0, 4.0]), 1) == pytest.approx(0.6)
    assert lowrank.frobenius_kept(torch.tensor([3.0, 4.0]), 2) == 1.0
    assert lowrank.frobenius_kept(torch.zeros(3), 1) == 1.0
    assert lowrank.dropped_norm(torch.tensor([3.0, 4.0, 12.0]), 1) == pytest.approx(math.sqrt(16 + 144))


def test_clamp_to_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(30, 4, generator=g), 3 * torch.randn(4, 20, generator=g)
    limit = float(torch.quantile(torch.cat([up.flatten(), down.flatten()]).double(), 0.9))
    clamped_up, clamped_down = lowrank.clamp_to_quantile(up, down, 0.9)
    assert float(torch.cat([clamped_up.flatten(), clamped_down.flatten()]).abs().max()) == pytest.approx(limit)
    torch.testing.assert_close(clamped_up, up.clamp(-limit, limit))
    torch.testing.assert_close(clamped_down, down.clamp(-limit, limit))
    assert int((clamped_down != down).sum()) > 0  # down's larger values were cut


def test_concat_sums_the_weighted_products():
    g = torch.Generator().manual_seed(3)
    parts = [(torch.randn(r, 5, 3, 3, generator=g), torch.randn(7, r, 1, 1, generator=g), w) for r, w in ((2, 0.5), (3, -1.5))]
    down, up = lowrank.concat(parts)
    assert down.shape == (5, 5, 3, 3) and up.shape == (7, 5, 1, 1)
    expected = sum(lowrank.lora_delta(d, u, w) for d, u, w in parts)
    torch.testing.assert_close(lowrank.lora_delta(down, up, 1.0), expected, rtol=1e-5, atol=1e-5)
