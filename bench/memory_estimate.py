"""Estimate (not measure) the GPU memory of a LoRA training step on full-size SD 1.5, on any machine.

    python bench/memory_estimate.py            # consumer and naive profiles at 512x512, batch 1

Weights, LoRA, gradients and optimizer state are counted from the real modules. Activations come
from tracing one forward pass of the full-size UNet on the meta device (shapes only, no memory, no
compute) and adding up the storages autograd saves for the backward pass, the way the GPU step would:
base weights excluded (they are counted once), attention saved as a fused SDPA kernel saves it
(q, k, v, out, log-sum-exp; no attention matrix). With gradient checkpointing the saved set is what
lives outside the checkpointed blocks plus each block's inputs, and the largest block's own saved
tensors come back during its recomputation. Not included: the CUDA context (outside torch's
allocator), allocator rounding and fragmentation (reserved - allocated), cuBLAS/cuDNN workspaces,
and the gradient tensors of the backward pass (a few activation-sized tensors at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys

import torch

GB = 1e9


class _FusedAttentionSaves(torch.autograd.Function):
    """Stands in for F.scaled_dot_product_attention on meta tensors: saves what the flash and
    memory-efficient kernels save (not the (S x S) probabilities the math fallback would)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace stops after the forward pass
        raise NotImplementedError


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttentionSaves.apply(q, k, v)


@contextlib.contextmanager
def _fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _lora_unet(rank: int, alpha: float, dtype: torch.dtype):
    from lora_offset.training import networks
    from lora_offset.sd15 import build_sd15

    unet = build_sd15("unet", "meta").to(dtype).requires_grad_(False)
    params = networks.add_lora(unet, networks.unet_lora_config(rank, alpha))
    # Under fp16/bf16 autocast the LoRA matmuls run in half precision: trace them that way.
    for p in params:
        p.data = p.data.to(dtype)
    unet.train()
    return unet, params


def unet_activations(*, checkpointing: bool, batch: int = 1, resolution: int = 512,
                     dtype: torch.dtype = torch.float16, rank: int = 32) -> dict[str, int]:
    """Bytes autograd keeps for the UNet's backward pass in one training step (see the module docstring).
    Returns {"saved": kept between forward and backward, "recompute": the largest checkpointed block's
    own saved tensors (0 without checkpointing), "total": their sum}."""
    unet, _ = _lora_unet(rank, rank / 2, dtype)
    weights = {_storage_id(p) for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        sid = _storage_id(t)
        if sid not in weights:
            saved[sid] = t.untyped_storage().nbytes()
        return t

    def checkpoint_inputs(module, *args):
        # What a checkpointed block keeps: its inputs (its own saved tensors are recomputed later).
        for a in args:
            if isinstance(a, torch.Tensor):
                saved[_storage_id(a)] = a.untyped_storage().nbytes()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return module(*args)  # the inner hooks hide the block's saved tensors from `pack`

    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_inputs)

    side = resolution // 8
    latents = torch.empty(batch, 4, side, side, device="meta", dtype=dtype)
    text = torch.empty(batch, 77, 768, device="meta", dtype=dtype)
    timesteps = torch.zeros(batch, device="meta", dtype=torch.long)
    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(latents, timesteps, text)
    total_saved = sum(saved.values())
    recompute = 0
    if checkpointing:
        # The largest block's saved tensors, from an un-checkpointed trace of the same step.
        blocks = unet_block_activations(batch=batch, resolution=resolution, dtype=dtype, rank=rank)
        recompute = max(blocks.values())
    return {"saved": total_saved, "recompute": recompute, "total": total_saved + recompute}


def unet_block_activations(*, batch: int, resolution: int, dtype: torch.dtype, rank: int) -> dict[str, int]:
    """{block kind and index: bytes it saves} for every ResNet and transformer block, without checkpointing."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    unet, _ = _lora_unet(rank, rank / 2, dtype)
    weights = {_storage_id(p) for p in unet.parameters()}
    names = {id(m): n for n, m in unet.named_modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))}
    per_block: dict[str, dict[int, int]] = {}
    stack: list[str] = []

    def pack(t):
        sid = _storage_id(t)
        if stack and sid not in weights:
            per_block.setdefault(stack[-1], {})[sid] = t.untyped_storage().nbytes()
        return t

    def enter(module, args):
        stack.append(names[id(module)])

    def leave(module, args, out):
        stack.pop()

    handles = []
    for m in unet.modules():
        if id(m) in names:
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    side = resolution // 8
    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(torch.empty(batch, 4, side, side, device="meta", dtype=dtype),
             torch.zeros(batch, device="meta", dtype=torch.long),
             torch.empty(batch, 77, 768, device="meta", dtype=dtype))
    for h in handles:
        h.remove()
    return {name: sum(sizes.values()) for name, sizes in per_block.items()}


@functools.lru_cache(maxsize=None)
def parameter_counts(rank: int = 32) -> dict[str, int]:
    """Parameter counts of the full-size components and of the rank-`rank` UNet LoRA (attention targets)."""
    from lora_offset.sd15 import build_sd15

    counts = {n: sum(p.numel() for p in build_sd15(n, "meta").parameters()) for n in ("unet", "vae", "text_encoder")}
    _, lora_params = _lora_unet(rank, rank / 2, torch.float32)
    counts["lora"] = sum(p.numel() for p in lora_params)
    counts["lora_tensors_below_4096"] = sum(1 for p in lora_params if p.numel() < 4096)
    return counts


def estimate(profile: str, resolution: int = 512, rank: int = 32) -> dict[str, float]:
    """GB (10^9 bytes) per item of the training loop's peak allocation for 'consumer' or 'naive' (batch 1)."""
    counts = dict(parameter_counts(rank))
    lora = counts["lora"]
    if profile == "consumer":
        half = torch.float16
        act = unet_activations(checkpointing=True, resolution=resolution, dtype=half, rank=rank)
        items = {
            "UNet weights (fp16)": counts["unet"] * 2,
            "LoRA weights (fp32)": lora * 4,
            "LoRA gradients (fp32)": lora * 4,
            # bitsandbytes 8-bit Adam: two uint8 moments + one fp32 absmax per 256-value block each
            # (every LoRA tensor here has >= 4096 values, so all of them get 8-bit state)
            "AdamW8bit state": lora * 2 + 2 * 4 * (lora // 256 + 1),
            "LoRA weights' fp16 autocast copies": lora * 2,
            "UNet activations, checkpointed (saved)": act["saved"],
            "UNet activations, largest block recomputed": act["recompute"],
        }
    elif profile == "naive":
        act = unet_activations(checkpointing=False, resolution=resolution, dtype=torch.float32, rank=rank)
        items = {
            "UNet + VAE + text encoder weights (fp32, all on the GPU)": (counts["unet"] + counts["vae"]
                                                                        + counts["text_encoder"]) * 4,
            "LoRA weights (fp32)": lora * 4,
            "LoRA gradients (fp32)": lora * 4,
            "AdamW state (fp32 moments)": lora * 8,
            "UNet activations, no checkpointing (saved)": act["saved"],
        }
    else:
        raise ValueError(f"no estimate for profile {profile!r}: 'consumer' or 'naive'")
    out = {k: v / GB for k, v in items.items()}
    out["total"] = sum(items.values()) / GB
    return out


def setup_phase_weights_gb(dtype_bytes: int = 2, rank: int = 32) -> float:
    """Weights on the GPU while latents are cached: train() moves UNet, VAE and text encoder there first."""
    c = dict(parameter_counts(rank))
    return ((c["unet"] + c["vae"] + c["text_encoder"]) * dtype_bytes + c["lora"] * 4) / GB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Estimate (not measure) SD 1.5 LoRA training memory, on the meta device.")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for profile in ("consumer", "naive"):
        est = estimate(profile, args.resolution, args.rank)
        print(f"{profile} (ESTIMATE, batch 1, {args.resolution}px, rank {args.rank}): training-loop peak allocation")
        for k, v in est.items():
            print(f"  {k:58s} {v:7.3f} GB")
    print(f"consumer set-up phase (latent caching), weights on the GPU: {setup_phase_weights_gb(2, args.rank):.3f} GB "
          "+ the VAE encoder's activations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
