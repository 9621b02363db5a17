"""The AUTOMATIC1111 oracle: which modules A1111's Lora extension patches for a file's keys."""

from __future__ import annotations

import functools
import re
from typing import Iterable

from lora_offset.formats.loaders.names import TEXT_ENCODER, UNET, ModelNames, _flat
from lora_offset.formats.loaders.result import LoaderResult, _first_dot, _lora_pair, _rejected

_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_convert_name(key: str) -> str:
    """Port of A1111 extensions-builtin/Lora/networks.py `convert_diffusers_name_to_compvis` (SD 1.x branch).

    Maps a kohya diffusers-style module key to A1111's flattened LDM module name; returns the key
    unchanged when no rule applies (as A1111 does).
    """
    def m(pattern):
        r = re.match(pattern, key)
        return [int(g) if g.isdigit() else g for g in r.groups()] if r else None

    if g := m(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{g[0]}"
    if g := m(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{g[0]}"
    if g := m(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"
    if g := m(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _A1111_RESNET.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return f"diffusion_model_input_blocks_{1 + g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if g := m(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _A1111_RESNET.get(g[2], g[2]) if g[0] == "resnets" else g[2]
        return f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else g[1] * 2}_{suffix}"
    if g := m(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _A1111_RESNET.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return f"diffusion_model_output_blocks_{g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if g := m(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"
    if g := m(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"
    if g := m(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        return f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"
    return key


@functools.lru_cache(maxsize=8)
def _a1111_layer_mapping(names: ModelNames) -> dict[str, str]:
    # networks.py `assign_network_names_to_compvis_modules`: every module of sd_model.model
    # ("diffusion_model.<ldm>") and of cond_stage_model.wrapped (FrozenCLIPEmbedder:
    # "transformer.text_model.<...>") under its name with "." -> "_".
    mapping = {_flat(f"diffusion_model.{ldm}"): UNET + d for d, ldm in names.unet_ldm.items()}
    mapping.update({_flat(f"transformer.{t}"): TEXT_ENCODER + t for t in names.text_encoder})
    return mapping


def match_a1111(keys: Iterable[str], names: ModelNames) -> LoaderResult:
    """AUTOMATIC1111 1.10 (+ dev branch), extensions-builtin/Lora/networks.py `load_network`.

    Module name = text before the first "." (`key.partition(".")`), converted by
    `convert_diffusers_name_to_compvis`, then looked up in the model's flattened module names; fallbacks:
    "lora_unet" -> "diffusion_model" (LDM-style kohya names), "lora_te1_text_model" ->
    "transformer_text_model". Unmatched keys are only logged at debug level: dropped silently.
    Per matched module, network_lora.py `ModuleTypeLora.create_module` needs lora_up+lora_down (or
    lora_B+lora_A); a module no type accepts raises AssertionError, which `load_networks` catches:
    the whole LoRA is not loaded. Missing alpha: network.py `calc_scale` -> 1.0.
    """
    keys = list(keys)
    mapping = _a1111_layer_mapping(names)
    re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")
    matched: dict[str, dict[str, str]] = {}
    failed: list[str] = []
    for key in keys:
        module, suffix = _first_dot(key)
        converted = a1111_convert_name(module)
        target = mapping.get(converted)
        if target is None and (xm := re_x_proj.match(converted)):
            # meant for SD 2's MultiheadAttention; for SD 1.x it can only hit a module without a weight
            target = mapping.get(xm.group(1))
        if target is None and "lora_unet" in module:
            target = mapping.get(module.replace("lora_unet", "diffusion_model"))
        elif target is None and "lora_te1_text_model" in module:
            target = mapping.get(module.replace("lora_te1_text_model", "0_transformer_text_model")) or mapping.get(
                module.replace("lora_te1_text_model", "transformer_text_model"))
        if target is None:
            failed.append(key)
        else:
            matched.setdefault(target, {})[suffix] = key
    result = LoaderResult("a1111")
    for target, suffixes in matched.items():
        if _lora_pair(suffixes) is None:
            return _rejected("a1111", keys, f"module {target} has {sorted(suffixes)} but no lora_up/lora_down pair: "
                             "A1111 raises 'Could not find a module type' and loads nothing")
        result.applied_modules.add(target)
        if "alpha" not in suffixes:
            result.missing_alpha.append(target)
    result.ignored_keys = sorted(failed)
    if failed:
        result.reason = (f"{len(failed)} keys match no module and are dropped silently (debug log only)"
                         + ("; the LoRA does nothing" if not matched else ""))
    result.missing_alpha.sort()
    return result
