"""The math of low-rank adapters, as pure functions on tensors: no files, no models.

A LoRA module changes a weight W [out, in] (or a conv weight [out, in, kh, kw], flattened to
[out, in*kh*kw]) by delta = scale * up @ down, with up [out, r] and down [r, in]. LyCORIS's LoHa
uses the elementwise product of two such products, LoKr a Kronecker product (see loha_delta,
lokr_delta; the scale each loader applies is the file format's business: formats/reader.py).

Truncation is by SVD: by the Eckart–Young theorem the best rank-k approximation of a matrix in
the Frobenius norm keeps its k largest singular values, and its error is the norm of the dropped
ones. SVDs here run in float64, on the factors when the matrix is a product of thin factors (a
LoRA is one: the SVD of up @ down comes from two QR decompositions and an r x r SVD, exact and
fast even for 1280 x 11520 conv weights).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
ZERO_SPECTRUM = 1e-6  # kohya's MIN_SV: a largest singular value at or below this is a zero matrix


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * up @ down in fp32, shaped like the weight: [out, in] or [out, in, kh, kw]."""
    rank = down.shape[0]
    delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)
    return (scale * delta).reshape(up.shape[0], *down.shape[1:])


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # LyCORIS's CP/Tucker form (use_effective_conv2d): core [r, r, kh, kw], a [r, out], b [r, in]
    # -> [out, in, kh, kw]; the contraction ComfyUI and PEFT (make_weight_cp) write out.
    return torch.einsum("i j k l, i p, j r -> p r k l", core.double(), a.double(), b.double())


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float,
               t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """LoHa: scale * (w1_a @ w1_b) * (w2_a @ w2_b) (elementwise), fp32.

    Plain factors: w*_a [out, r], w*_b [r, in*kh*kw] (a 4-D w*_b is flattened); the result is
    [out, in*kh*kw]. With Tucker cores t1, t2 [r, r, kh, kw] (then w*_a [r, out], w*_b [r, in]) it
    is [out, in, kh, kw].
    """
    if t1 is not None:
        m1, m2 = _tucker(t1, w1_a, w1_b), _tucker(t2, w2_a, w2_b)
    else:
        m1 = w1_a.double().reshape(w1_a.shape[0], -1) @ w1_b.double().reshape(w1_b.shape[0], -1)
        m2 = w2_a.double().reshape(w2_a.shape[0], -1) @ w2_b.double().reshape(w2_b.shape[0], -1)
    return (scale * m1 * m2).float()


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """LoKr: scale * kron(w1, w2), fp32. w1 [a, c]; w2 [b, d] gives [a*b, c*d]; a 4-D w2
    [b, d, kh, kw] gives [a*b, c*d, kh, kw] (w1 is repeated over the kernel, as every loader does)."""
    w1 = w1.double()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (scale * torch.kron(w1, w2.double())).float()


def lokr_factor(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None,
                tucker: torch.Tensor | None = None) -> torch.Tensor:
    """One Kronecker factor of a LoKr module: stored whole, as a @ b, or in Tucker form (w2 only)."""
    if full is not None:
        return full.double()
    if tucker is not None:
        return _tucker(tucker, a, b)
    return a.double().reshape(a.shape[0], -1) @ b.double().reshape(b.shape[0], -1)


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of up @ down ([m, r] @ [r, n]) from the factors, in float64.

    up = Qu Ru and down^T = Qd Rd (QR), so up @ down = Qu (Ru Rd^T) Qd^T and the SVD of the small
    core Ru Rd^T gives the rest. S has min(m, n, r) entries, descending; the singular values of
    up @ down beyond them are exactly zero.
    """
    qu, ru = torch.linalg.qr(up.double().reshape(up.shape[0], -1))
    qd, rd = torch.linalg.qr(down.double().reshape(down.shape[0], -1).T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ u, s, vh @ qd.T


def dense_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of a matrix (a conv weight is flattened to [out, in*kh*kw]), in float64."""
    return torch.linalg.svd(matrix.double().reshape(matrix.shape[0], -1), full_matrices=False)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [m, k], down [k, n]) keeping the `rank` largest singular values; up carries them (as kohya)."""
    k = min(rank, s.shape[0])
    return u[:, :k] * s[:k], vh[:k]


def dropped_norm(singular_values: torch.Tensor, rank: int) -> float:
    """Frobenius norm of what a rank-`rank` truncation drops: sqrt(sum of the dropped s^2)."""
    return float(singular_values.double()[rank:].pow(2).sum().sqrt())


def frobenius_kept(singular_values: torch.Tensor, rank: int) -> float:
    """Share of the Frobenius norm a rank-`rank` truncation keeps (kohya's "fro retained"); 1 for a zero matrix."""
    s2 = singular_values.double().pow(2)
    total = float(s2.sum())
    return 1.0 if total == 0 else math.sqrt(float(s2[:rank].sum()) / total)


def dynamic_rank(singular_values: Sequence[float] | torch.Tensor, method: str, param: float, max_rank: int) -> int:
    """The rank kohya's networks/resize_lora.py chooses for a spectrum (`rank_resize`).

    `singular_values`: the whole spectrum of the module's delta, descending, min(out, in) long
    (zeros included). With n values, each method counts the values it keeps, c, clamps c to
    [1, n - 1] and returns c + 1 (kohya keeps one more than it counts), at most `max_rank`:
    - sv_ratio:      c = #{s > s_0 / param}: values within a factor `param` of the largest;
    - sv_cumulative: c = the fewest leading values whose sum reaches `param` of the total sum;
    - sv_fro:        c = the fewest leading values whose squares reach `param`^2 of the total,
                     i.e. that keep `param` of the Frobenius norm.
    A spectrum whose largest value is at most 1e-6 (a zero matrix) gets rank 1.
    """
    s = torch.as_tensor(singular_values, dtype=torch.float64).reshape(-1)
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"unknown dynamic method {method!r}; expected one of {', '.join(DYNAMIC_METHODS)}")
    if s.numel() == 0 or float(s[0]) <= ZERO_SPECTRUM:
        return 1
    if method == "sv_ratio":
        count = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        count = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(float(param), dtype=torch.float64))) + 1
    else:
        s2 = s.pow(2)
        count = int(torch.searchsorted(torch.cumsum(s2, 0) / s2.sum(), torch.tensor(float(param) ** 2, dtype=torch.float64))) + 1
    count = max(1, min(count, s.numel() - 1))
    return min(count + 1, max_rank)


def concat(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up @ down = sum of weight * up_i @ down_i over `parts` = (down_i, up_i, weight_i).

    Exact: the ranks add up (the factors are stacked), and each weight (ratio * scale, sign included)
    goes into its up_i. All downs must have the same trailing shape [in] or [in, kh, kw].
    """
    downs = [down.float() for down, _, _ in parts]
    ups = [(weight * up.double()).float() for _, up, weight in parts]
    return torch.cat(downs, dim=0), torch.cat(ups, dim=1)


def clamp_to_quantile(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's extract_lora_from_models.py `--clamp_quantile`: with h the `quantile` of all values of
    up and down together (linear interpolation, as torch.quantile, without its size limit), clamp
    both to [-h, h]. It trims outliers at the cost of the SVD optimum."""
    values = torch.cat([up.reshape(-1), down.reshape(-1)]).double().sort().values
    position = quantile * (values.numel() - 1)
    low = int(math.floor(position))
    high = min(low + 1, values.numel() - 1)
    limit = float(values[low] + (position - low) * (values[high] - values[low]))
    return up.clamp(-limit, limit), down.clamp(-limit, limit)
