"""kohya / A1111 LoRA key names for SD 1.x: pure functions, no I/O.

A kohya module key is a prefix plus the diffusers module path with "." replaced by "_":
    down_blocks.0.attentions.0.proj_in  ->  lora_unet_down_blocks_0_attentions_0_proj_in
Text-encoder keys always carry `text_model_` (transformers 5 dropped that level from CLIPTextModel
module names, but every web UI's loader expects it):
    encoder.layers.0.self_attn.q_proj   ->  lora_te_text_model_encoder_layers_0_self_attn_q_proj
The "." -> "_" rename loses information, so going back needs the model's module names.
"""

from __future__ import annotations

from typing import Iterable

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def normalize_text_encoder_name(module_name: str) -> str:
    """CLIP text-encoder module path with the `text_model.` level, whatever transformers wrote."""
    return module_name if module_name.startswith("text_model.") else f"text_model.{module_name}"


def kohya_name(prefix: str, module_name: str) -> str:
    """kohya module key for a diffusers (UNet) or transformers (text encoder) module path."""
    if prefix == TEXT_ENCODER_PREFIX:
        module_name = normalize_text_encoder_name(module_name)
    return f"{prefix}_{module_name.replace('.', '_')}"


def kohya_to_module_map(prefix: str, module_names: Iterable[str]) -> dict[str, str]:
    """{kohya module key: module path} for the given module paths (the inverse of `kohya_name`)."""
    return {kohya_name(prefix, name): name for name in module_names}


def split_key(key: str) -> tuple[str, str]:
    """'lora_unet_x.lora_down.weight' -> ('lora_unet_x', 'lora_down.weight'): module = text before the first '.'."""
    module, _, suffix = key.partition(".")
    return module, suffix
