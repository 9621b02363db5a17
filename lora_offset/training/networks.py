"""PEFT LoRA injection on kohya's SD 1.x targets.

kohya's default SD 1.x LoRA touches every Linear / 1x1 Conv inside the UNet's transformer blocks
(192 modules in SD 1.5) and, when the text encoder is trained, CLIP's attention and MLP
projections (72 modules). Conv LoRA ("LoCon", conv_rank > 0) adds the ResNet blocks and the
down/up samplers: 3x3 convs get conv_rank/conv_alpha, while their Linear time_emb_proj and 1x1
conv_shortcut get rank/alpha, as kohya does.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig

ADAPTER_NAME = "default"

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


def add_lora(model: torch.nn.Module, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter into a diffusers or transformers model; return its trainable parameters.

    The base weights stay frozen (in whatever dtype they have); LoRA weights are created and kept
    in fp32 so that small updates are not lost to half-precision rounding.
    """
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=ADAPTER_NAME)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA (the PEFT LoraLayer wrappers), in model order."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def lora_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def matches(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None
