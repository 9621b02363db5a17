"""kohya's regularizers of a network: rank and module dropout, and max-norm (`scale_weight_norms`).

Rank and module dropout (network.rank_dropout, network.module_dropout), as kohya's LoRAModule.forward
(networks/lora.py) does them, in training mode only:
- module dropout p: in each forward pass, the whole module's delta is left out with probability p;
- rank dropout p: each of the r ranks is zeroed with probability p, independently per sample, and the
  delta is scaled by 1 / (1 - p) (kohya's "as if the rank were changed").
For a LoRA they act on PEFT's `lora_A` output (the rank-r activations) through a forward hook: the
delta lora_B(mask * lora_A(x)) is kohya's. A dropped module is multiplied by zero rather than
skipped, so every parameter still gets a (zero) gradient, which keeps multi-process training's
gradient reduction whole; AdamW then still applies its weight decay and moment decay to it, which
kohya's skip does not. LoHa and LoKr use PEFT's own `rank_dropout` / `module_dropout` (LyCORIS's
semantics: rank dropout drops rows of the delta weight and rescales by the kept share).

Max-norm (network.scale_weight_norms = bound; kohya's `apply_max_norm_regularization`): after every
optimizer step, each module whose delta (scale included) has a Frobenius norm above the bound has
its factors scaled so that the norm equals the bound: a LoRA's up and down each by sqrt(ratio) as
kohya does, and in general each of the module's n factor tensors by ratio^(1/n) (the delta is linear
in each factor: LoHa has 4, LoKr 2 to 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_offset.training.networks import ADAPTER_NAME, is_adapter_parameter


class RankModuleDropout:
    """Forward hook on a LoRA's lora_A: kohya's module dropout, then rank dropout, while training."""

    def __init__(self, rank_dropout: float, module_dropout: float):
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def __call__(self, module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        if self.module_dropout and float(torch.rand(1)) < self.module_dropout:
            return output * 0.0
        if self.rank_dropout:
            batch = output.shape[0]
            rank = output.shape[1] if output.dim() == 4 else output.shape[-1]
            keep = (torch.rand((batch, rank), device=output.device) > self.rank_dropout).to(output.dtype)
            if output.dim() == 3:  # [batch, tokens, rank]
                keep = keep.unsqueeze(1)
            elif output.dim() == 4:  # a conv's [batch, rank, h, w]
                keep = keep.unsqueeze(-1).unsqueeze(-1)
            output = output * keep / (1.0 - self.rank_dropout)
        return output


def add_rank_module_dropout(model: torch.nn.Module, rank_dropout: float, module_dropout: float) -> int:
    """Hook kohya's rank / module dropout onto every LoRA layer of `model`; returns the number of layers."""
    from peft.tuners.lora import LoraLayer

    if not rank_dropout and not module_dropout:
        return 0
    hook = RankModuleDropout(rank_dropout, module_dropout)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A]
    for layer in layers:
        layer.lora_A[ADAPTER_NAME].register_forward_hook(hook)
    return len(layers)


@dataclass
class MaxNormStats:
    """kohya's max_norm/* log values: modules scaled this step, the mean and the largest norm after scaling."""

    keys_scaled: int
    average_key_norm: float
    max_key_norm: float


def adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, (LoraLayer, LoHaLayer, LoKrLayer))]


def factors(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's own tensors of one layer (lora_A/B, hada_*, lokr_*), those its delta is a product of."""
    return [p for name, p in layer.named_parameters()
            if is_adapter_parameter(name) and ADAPTER_NAME in name.split(".") and "base_layer" not in name]


@torch.no_grad()
def scale_weight_norms(models: list[torch.nn.Module], max_norm: float) -> MaxNormStats:
    """Scale each module whose delta norm exceeds `max_norm` down to it (see the module docstring)."""
    scaled, norms = 0, []
    for model in models:
        for layer in adapter_layers(model):
            norm = float(layer.get_delta_weight(ADAPTER_NAME).float().norm())
            tensors = factors(layer)
            if norm > max_norm:
                ratio = max_norm / norm
                for p in tensors:
                    p.mul_(ratio ** (1.0 / len(tensors)))
                scaled += 1
                norm = max_norm
            norms.append(norm)
    return MaxNormStats(scaled, sum(norms) / len(norms) if norms else 0.0, max(norms, default=0.0))
