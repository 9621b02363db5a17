"""PEFT adapters on kohya's SD 1.x targets: LoRA, and LyCORIS's LoHa and LoKr (network.type).

kohya's default SD 1.x LoRA touches every Linear / 1x1 Conv inside the UNet's transformer blocks
(192 modules in SD 1.5) and, when the text encoder is trained, CLIP's attention and MLP
projections (72 modules). Conv LoRA ("LoCon", conv_rank > 0) adds the ResNet blocks and the
down/up samplers: 3x3 convs get conv_rank/conv_alpha, while their Linear time_emb_proj and 1x1
conv_shortcut get rank/alpha, as kohya does. LoHa and LoKr use the same targets, through PEFT's
LoHaConfig / LoKrConfig (PEFT 0.21, peft/tuners/loha, peft/tuners/lokr):
- LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b) (elementwise) * alpha / r, each pair of rank r =
  network.loha_rank (default network.rank): the delta's rank can reach r^2 for twice LoRA's parameters.
- LoKr: delta = kron(w1, w2) * alpha / r. Each weight [out, in] is split as out = a*b, in = c*d with
  w1 [a, c] and w2 [b, d]; network.lokr_factor (PEFT's decompose_factor) picks a and c (-1: the
  divisor pair nearest the square root). w2 is stored as a rank-r product (r = network.rank) when r
  is below half its larger side, else whole.
The Tucker ("effective conv2d") forms are off: every loader reads the plain factors.
"""

from __future__ import annotations

import re

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig

ADAPTER_NAME = "default"
NETWORK_TYPES = ("lora", "loha", "lokr")
# Parameter-name prefixes of PEFT's LoraModel, LoHaModel and LoKrModel (their `prefix` attribute).
ADAPTER_PARAMETER_PREFIXES = ("lora_", "hada_", "lokr_")

# Module-name regexes (PEFT full-matches a string target_modules against each module name).
UNET_ATTENTION_TARGETS = (
    r".*attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
)
UNET_CONV_3X3_TARGETS = r".*(resnets\.\d+\.(conv1|conv2)|downsamplers\.0\.conv|upsamplers\.0\.conv)"
UNET_CONV_RANK_TARGETS = r".*resnets\.\d+\.(time_emb_proj|conv_shortcut)"
# transformers 5 CLIPTextModel names have no "text_model." level; 4.x names do: match both.
TEXT_ENCODER_TARGETS = r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"


def unet_lora_config(rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float = 1.0,
                     dropout: float = 0.0) -> LoraConfig:
    """LoraConfig for the UNet: attention targets, plus ResNet/sampler convs when conv_rank > 0."""
    target = UNET_ATTENTION_TARGETS
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if conv_rank > 0:
        target = f"({UNET_ATTENTION_TARGETS}|{UNET_CONV_3X3_TARGETS}|{UNET_CONV_RANK_TARGETS})"
        rank_pattern = {UNET_CONV_3X3_TARGETS: conv_rank}
        alpha_pattern = {UNET_CONV_3X3_TARGETS: conv_alpha}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def text_encoder_lora_config(rank: int, alpha: float, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
        target_modules=TEXT_ENCODER_TARGETS,
    )


def unet_network_config(network_type: str, rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float = 1.0,
                        dropout: float = 0.0, lokr_factor: int = -1) -> LoraConfig | LoHaConfig | LoKrConfig:
    """The PEFT config of a LoRA, LoHa or LoKr on the UNet's kohya targets (conv ones when conv_rank > 0)."""
    if network_type == "lora":
        return unet_lora_config(rank, alpha, conv_rank, conv_alpha, dropout)
    lora = unet_lora_config(rank, alpha, conv_rank, conv_alpha)
    return _lycoris_config(network_type, rank, alpha, lora.target_modules, lora.rank_pattern, lora.alpha_pattern,
                           lokr_factor)


def text_encoder_network_config(network_type: str, rank: int, alpha: float, dropout: float = 0.0,
                                lokr_factor: int = -1) -> LoraConfig | LoHaConfig | LoKrConfig:
    if network_type == "lora":
        return text_encoder_lora_config(rank, alpha, dropout)
    return _lycoris_config(network_type, rank, alpha, TEXT_ENCODER_TARGETS, {}, {}, lokr_factor)


def _lycoris_config(network_type: str, rank: int, alpha: float, targets, rank_pattern: dict, alpha_pattern: dict,
                    lokr_factor: int) -> LoHaConfig | LoKrConfig:
    common = dict(r=rank, alpha=alpha, target_modules=targets, rank_pattern=dict(rank_pattern),
                  alpha_pattern=dict(alpha_pattern), use_effective_conv2d=False)
    if network_type == "loha":
        return LoHaConfig(**common)
    if network_type == "lokr":
        return LoKrConfig(**common, decompose_factor=lokr_factor, decompose_both=False)
    raise ValueError(f"unknown network type {network_type!r}; expected one of {', '.join(NETWORK_TYPES)}")


def network_configs(net) -> tuple:
    """(UNet config, text-encoder config or None) for a config's [network] section (lora_offset.config.NetworkConfig)."""
    rank = net.loha_rank if net.type == "loha" and net.loha_rank is not None else net.rank
    unet = unet_network_config(net.type, rank, net.alpha, net.conv_rank, net.conv_alpha, net.dropout, net.lokr_factor)
    te = text_encoder_network_config(net.type, rank, net.alpha, net.dropout, net.lokr_factor) if net.train_text_encoder else None
    return unet, te


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name is a LoRA / LoHa / LoKr weight (PEFT puts the prefix on the parameter's own name)."""
    return any(prefix in name for prefix in ADAPTER_PARAMETER_PREFIXES)


def add_lora(model: torch.nn.Module, config: LoraConfig | LoHaConfig | LoKrConfig) -> list[torch.nn.Parameter]:
    """Inject a LoRA (or LoHa / LoKr) adapter into a diffusers or transformers model; return its trainable parameters.

    The base weights stay frozen (in whatever dtype they have); adapter weights are created and kept
    in fp32 so that small updates are not lost to half-precision rounding.
    """
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=ADAPTER_NAME)
    params = [p for n, p in model.named_parameters() if is_adapter_parameter(n)]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry an adapter (PEFT's LoRA / LoHa / LoKr layer wrappers), in model order."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, (LoraLayer, LoHaLayer, LoKrLayer))]


def lora_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if is_adapter_parameter(n))


def matches(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None
