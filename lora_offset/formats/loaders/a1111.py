"""The AUTOMATIC1111 oracle: which modules A1111's Lora extension patches for a file's keys."""

from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping

from lora_offset.formats.loaders.names import TEXT_ENCODER, UNET, ModelNames, _flat
from lora_offset.formats.loaders.result import (LoaderResult, _first_dot, _lora_pair, _lycoris_type, _rejected,
                                                _uses_alpha)

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
    lora_B+lora_A), network_hada.py the four hada_w*, network_lokr.py lokr_w1 (or _a+_b) and lokr_w2
    (or _a+_b); a module no type accepts raises AssertionError, which `load_networks` catches: the
    whole LoRA is not loaded. Missing alpha: network.py `calc_scale` -> 1.0.
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
        if _lora_pair(suffixes) is None and _lycoris_type(suffixes) is None:
            return _rejected("a1111", keys, f"module {target} has {sorted(suffixes)}, no LoRA, LoHa or LoKr set: "
                             "A1111 raises 'Could not find a module type' and loads nothing")
        result.applied_modules.add(target)
        if "alpha" not in suffixes and _uses_alpha(suffixes):
            result.missing_alpha.append(target)
    result.ignored_keys = sorted(failed)
    if failed:
        result.reason = (f"{len(failed)} keys match no module and are dropped silently (debug log only)"
                         + ("; the LoRA does nothing" if not matched else ""))
    result.missing_alpha.sort()
    return result


def a1111_weight_delta(weights: Mapping, weight_shape: tuple[int, ...]):
    """What A1111 1.10 adds to a weight of `weight_shape` for one module's tensors {suffix: tensor}, at
    multiplier 1, in float64. LoRA: network_lora.py `calc_updown` (lyco_helpers.rebuild_conventional);
    LoHa: network_hada.py (rebuild_conventional of each pair, multiplied); LoKr: network_lokr.py
    (`make_kron`, w1 unsqueezed over a 4-D w2's kernel); then network.py `finalize_updown` reshapes to
    the weight and multiplies by `calc_scale`: alpha / dim, or 1.0 when alpha or dim is missing
    (dim: lora_down's rows; hada_w1_b's; lokr_w1_b's, overwritten by lokr_w2_b's). The Tucker forms
    (hada_t1, lokr_t2, lora_mid) are not modelled.
    """
    import math

    import torch

    w = {k: v.double() for k, v in weights.items()}
    alpha = float(w["alpha"]) if "alpha" in w else None

    def rebuild(up, down, shape):
        return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)

    if "lora_up.weight" in w:
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        updown = rebuild(up, down, [up.size(0), down.size(1), *down.shape[2:]])
    elif "hada_w1_a" in w:
        w1a, w1b, w2a, w2b = (w[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        dim = w1b.shape[0]
        shape = [w1a.size(0), w1b.size(1), *(w1b.shape[2:] if w1b.dim() == 4 else [])]
        updown = rebuild(w1a, w1b, shape) * rebuild(w2a, w2b, shape)
    else:
        dim = w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else dim
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        shape = list(weight_shape) if len(weight_shape) == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(shape)
    if updown.numel() == math.prod(weight_shape):
        updown = updown.reshape(weight_shape)
    return updown * (alpha / dim if alpha is not None and dim is not None else 1.0)
