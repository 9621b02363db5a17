"""The math of low-rank adapters, as pure functions on tensors: no files, no models.

A LoRA module changes a weight W [out, in] (or a conv weight [out, in, kh, kw], flattened to
[out, in*kh*kw]) by delta = scale * up @ down, with up [out, r] and down [r, in].
"""

from __future__ import annotations

import torch


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * up @ down in fp32, shaped like the weight: [out, in] or [out, in, kh, kw]."""
    rank = down.shape[0]
    delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)
    return (scale * delta).reshape(up.shape[0], *down.shape[1:])
