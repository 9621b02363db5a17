"""How the frozen UNet's weights are stored while a LoRA trains on it: `model.base_precision`.

The math always runs in the training dtype (`training.mixed_precision`: fp16 or bf16 on a GPU; on a
CPU, fp16 falls back to fp32); `base_precision` only says how the frozen weights sit in memory
between uses. LoRA weights are fp32 whatever this says.

    auto   stored in the training dtype (no casting: the behaviour before this setting existed)
    fp16   stored as float16       } when this differs from the training dtype, each layer's weights are
    bf16   stored as bfloat16      } cast to the training dtype just before the layer runs and dropped
    fp32   stored as float32       } after it (diffusers' layerwise casting)
    fp8    stored as float8_e4m3fn (1 byte) through diffusers' layerwise casting, as kohya's --fp8_base
    nf4    4-bit NormalFloat, bitsandbytes' QLoRA storage (blocksize 64, double-quantized absmax:
           about 0.52 bytes per weight), dequantized to the training dtype per layer, forward and backward

Which layers: every Linear and Conv2d of the UNet (norm layers keep the training dtype; diffusers skips
them too), never the LoRA's own layers. NF4 goes through `bitsandbytes.nn.Linear4bit` for the Linear
layers; bitsandbytes has no 4-bit convolution, and 63 % of SD 1.5's UNet weights are 3x3 convolutions
(a Linear-only NF4 UNet keeps 0.77x of its fp16 bytes), so `NF4Conv2d` stores a convolution's weight
with bitsandbytes' own NF4 quantizer (`bitsandbytes.nn.Params4bit`) and dequantizes it per call.

The LoRA learns a delta on top of the weights it sees, i.e. the dequantized ones; the exported kohya
file is that delta, the same format as any other. Applied to the original full-precision base (how
every web UI uses it) it sits on weights that differ from the trained-against ones by the storage's
rounding: the metadata records it (see `metadata`) and `lora-offset merge` says so.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

log = logging.getLogger("lora_offset")

PRECISIONS = ("auto", "fp16", "bf16", "fp32", "fp8", "nf4")
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
QUANTIZED = ("fp8", "nf4")  # storage that changes the weights the LoRA trains against
# Measured (docs/PERFORMANCE.md, SD 1.5 on CPU): fp8 storage without checkpointing peaked above fp32 storage.
LAYERWISE_WITHOUT_CHECKPOINTING = (
    "model.base_precision = %r with training.gradient_checkpointing = false: every layer's copy in the training "
    "dtype stays alive until the backward pass, so the training step can need more memory than with no "
    "base_precision at all; set gradient_checkpointing = true (or use \"nf4\", which re-reads its 4-bit weights "
    "in the backward pass)")
NF4_BLOCKSIZE = 64  # QLoRA's: one absmax per 64 weights, the absmax themselves 8-bit quantized in blocks of 256


def apply(unet: nn.Module, precision: str, compute_dtype: torch.dtype) -> None:
    """Store `unet`'s frozen weights as `precision`, computing in `compute_dtype`. Call after the LoRA is added
    (its layers are left alone) and before the UNet moves to the GPU (the casting happens where it sits)."""
    if precision not in PRECISIONS:
        raise ValueError(f"base precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto" or STORAGE_DTYPES.get(precision) == compute_dtype:
        return  # already stored as it is computed
    if precision == "nf4":
        quantize_nf4(unet, compute_dtype)
    else:
        # diffusers skips the norm layers and PEFT's LoRA layers by default.
        unet.enable_layerwise_casting(storage_dtype=STORAGE_DTYPES[precision], compute_dtype=compute_dtype)
        if not getattr(unet, "is_gradient_checkpointing", True):
            log.warning(LAYERWISE_WITHOUT_CHECKPOINTING, precision)
        for module in unet.modules():
            if isinstance(module, nn.Conv2d) and _has_layerwise_casting(module):
                module._conv_forward = types.MethodType(_conv_forward_on_alias, module)


def _has_layerwise_casting(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("layerwise_casting") is not None


def _conv_forward_on_alias(self: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias):
    # Layerwise casting swaps the parameter's data back to the storage dtype right after the forward
    # (`module.to(storage)` sets `param.data`). conv2d saves the weight tensor itself for its backward, so
    # the backward would find fp8 data: "expected scalar type Float but found Float8_e4m3fn" (diffusers 0.42,
    # torch 2.13). An alias made before the swap keeps the compute-dtype copy for the backward, as the
    # `weight.t()` view that linear saves already does.
    return nn.Conv2d._conv_forward(self, x, weight.detach(), bias)


def metadata(precision: str, compute_dtype: torch.dtype) -> dict[str, str]:
    """The adapter file's record of the base it trained against: kohya's keys and ours (strings, as kohya writes).

    kohya's `ss_fp8_base` means UNet and text encoder in fp8 and `ss_fp8_base_unet` the UNet alone, which is
    what base_precision = "fp8" does; kohya has no key for NF4. Ours, `lora_offset.base_precision`, names the
    storage as it ran: "auto" resolves to the training dtype."""
    stored = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[compute_dtype] \
        if precision == "auto" else precision
    return {"ss_fp8_base": "False", "ss_fp8_base_unet": str(precision == "fp8"),
            "lora_offset.base_precision": stored}


def quantized_base(metadata: dict[str, str]) -> str | None:
    """"fp8" or "nf4" when a LoRA file's metadata says it trained against a quantized base (ours, or kohya's
    --fp8_base / --fp8_base_unet), else None."""
    ours = metadata.get("lora_offset.base_precision")
    if ours in QUANTIZED:
        return ours
    if "True" in (metadata.get("ss_fp8_base"), metadata.get("ss_fp8_base_unet")):
        return "fp8"
    return None


def merge_note(name: str, precision: str) -> str:
    """What `merge` tells about a LoRA trained against a quantized base."""
    storage = {"fp8": "fp8 (float8_e4m3fn)", "nf4": "NF4 (4-bit)"}[precision]
    return (f"note: {name} was trained against an {storage} copy of its base UNet: it learned its delta on top "
            f"of the dequantized weights, and merging adds that delta to this checkpoint's full-precision "
            f"weights, which differ from them by the {precision} rounding. Web UIs apply it the same way; the "
            f"merged model can differ slightly from what training saw.")


# ---------------------------------------------------------------------------------------------------
# NF4


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every Linear and Conv2d of `model` outside the LoRA layers by its NF4-stored twin, in place.
    Returns how many layers were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name.startswith("lora_") or "lora_" in name.split(".")[-1]:
                continue  # the LoRA's own layers (lora_A, lora_B, ...) train in fp32
            if type(child) is nn.Linear:
                new = _nf4_linear(child, compute_dtype, bnb)
            elif type(child) is nn.Conv2d and child.padding_mode == "zeros":
                new = NF4Conv2d(child, compute_dtype)
            else:
                continue
            setattr(module, child_name, new)
            replaced += 1
    return replaced


def _nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, bnb) -> nn.Module:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=NF4_BLOCKSIZE, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes repacks a layer that runs in eval mode without gradients into
    # an inference-only layout whose matmul computes in bf16 and has no backward (bitsandbytes 0.50,
    # Linear4bit.forward): a sample taken mid-training would leave the UNet untrainable.
    layer.support_avx512bf16_for_cpu = False
    layer.weight = layer.weight.to(linear.weight.device)  # Params4bit quantizes on its first move
    return layer.requires_grad_(False)


class _NF4Convolution(torch.autograd.Function):
    """conv2d with a weight dequantized for the call; backward dequantizes again rather than keep the
    full-precision weight alive until then (as bitsandbytes' MatMul4Bit does for Linear4bit)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        out = torch.nn.functional.conv2d(x, layer.dequantized(x.dtype), bias, layer.stride, layer.padding,
                                         layer.dilation, layer.groups)
        ctx.layer, ctx.input_shape, ctx.dtype = layer, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, layer.dequantized(grad_out.dtype), grad_out,
                                                layer.stride, layer.padding, layer.dilation, layer.groups)
        return grad_x, None, None


class NF4Conv2d(nn.Module):
    """A frozen Conv2d whose weight is stored in NF4 (bitsandbytes' quantizer on the weight flattened to
    [out, in * kh * kw]) and computed in the input's dtype, or `compute_dtype` when that is set."""

    def __init__(self, conv: nn.Conv2d, compute_dtype: torch.dtype):
        import bitsandbytes as bnb

        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight_shape = tuple(conv.weight.shape)
        self.compute_dtype = compute_dtype
        flat = conv.weight.data.reshape(conv.out_channels, -1)
        self.weight = bnb.nn.Params4bit(flat, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                        blocksize=NF4_BLOCKSIZE).to(conv.weight.device)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.data.to(compute_dtype), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _NF4Convolution.apply(x, self, bias).to(in_dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nf4")


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer computes with, in fp32 and its natural shape (NF4, fp8-stored or plain)."""
    import bitsandbytes as bnb

    if isinstance(layer, NF4Conv2d):
        return layer.dequantized(torch.float32)
    if isinstance(layer, bnb.nn.Linear4bit):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.detach().float()


# ---------------------------------------------------------------------------------------------------
# Accounting


def frozen_bytes(model: nn.Module) -> int:
    """Bytes the model's frozen weights occupy as stored: parameters that do not train and buffers, in their
    own dtypes, plus the NF4 layers' quantization statistics (absmax, their second-level absmax and the code
    tables), which bitsandbytes keeps beside the packed weight rather than as parameters."""
    total = 0
    seen: set[int] = set()
    for tensor in [p for p in model.parameters() if not p.requires_grad] + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            parts = [state.absmax, state.code]
            if state.nested:
                parts += [state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts if torch.is_tensor(t))
    return total
