"""The InvokeAI oracle: probe, load and patch of a single-file SD 1.x LoRA."""

from __future__ import annotations

from typing import Iterable, Mapping

from lora_offset.formats.loaders.names import TEXT_ENCODER, UNET, ModelNames
from lora_offset.formats.loaders.result import LoaderResult, _first_dot, _group, _rejected

# invokeai/backend/patches/layers/utils.py `any_lora_layer_from_state_dict`: the leaf keys that make a layer.
_INVOKE_LAYER_KEYS = ("dora_scale", "lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a", "diff", "on_input", "w_norm")


def _invoke_resolve(flat: str, tree: frozenset[str]) -> str | None:
    """invokeai/backend/patches/layer_patcher.py `LayerPatcher._get_submodule` for flattened keys:
    walk the module tree, gluing "_"-separated parts until a submodule of that name exists."""
    parts = flat.split("_")
    current, name = "", parts.pop(0)
    while parts:
        candidate = f"{current}.{name}" if current else name
        if candidate in tree:
            current, name = candidate, parts.pop(0)
        else:
            name += "_" + parts.pop(0)
    final = f"{current}.{name}" if current else name
    return final if final in tree else None


def match_invokeai(keys: Iterable[str], names: ModelNames, shapes: Mapping[str, tuple] | None = None) -> LoaderResult:
    """InvokeAI 5.x/6.x, single-file SD 1.x LoRA.

    1. Probe (invokeai/backend/model_manager/util/model_util.py `lora_token_vector_length`): the base
       model is read off a `lora_unet_*_attn2_to_k/v.lora_down.weight` or `lora_te*_self_attn_*.lora_down.weight`
       key (shape[1] = 768 for SD 1.x, checked when `shapes` are given); none: "unknown LoRA type", not installed.
    2. Load (patches/lora_conversions/sd_lora_conversion_utils.py `lora_model_from_sd_state_dict`, no key
       conversion for SD 1.x): keys grouped by the text before the first "."; a group without
       lora_up.weight (or a LyCORIS leaf) raises "Unsupported lora format": the whole LoRA fails.
    3. Patch (patches/layer_patcher.py `apply_smart_model_patch` with prefix "lora_unet_" for the UNet and
       "lora_te_" for the text encoder): other layers are skipped silently; a layer whose flattened
       name resolves to no submodule raises at generation time. Missing alpha: scale 1.0 (lora_layer.py).
    Assumes InvokeAI's CLIPTextModel has the `text_model.` level (transformers 4.x; unverified for an
    InvokeAI on transformers 5, where `lora_te_text_model_...` would no longer resolve).
    """
    keys = list(keys)
    probe = None
    for key in keys:
        module, leaf = _first_dot(key)
        if leaf == "lora_down.weight" and ((key.startswith("lora_unet_") and ("_attn2_to_k." in key or "_attn2_to_v." in key))
                                           or (key.startswith("lora_te") and "_self_attn_" in key)):
            probe = key
            break
    if probe is None:
        return _rejected("invokeai", keys, "no lora_unet_*attn2_to_k/v or lora_te*_self_attn_* lora_down key: "
                         "InvokeAI cannot tell the base model ('unknown LoRA type') and will not install it")
    if shapes is not None and probe in shapes and tuple(shapes[probe])[1] != 768:
        return _rejected("invokeai", keys, f"{probe} has in-width {tuple(shapes[probe])[1]}, not 768: not an SD 1.x LoRA to InvokeAI")
    groups = _group(keys, _first_dot)
    for stem, leaves in groups.items():
        if not any(k in leaves for k in _INVOKE_LAYER_KEYS):
            return _rejected("invokeai", keys, f"layer {stem!r} has {sorted(leaves)}: InvokeAI raises 'Unsupported lora format'")
        if "lora_up.weight" in leaves and "dora_scale" not in leaves and "lora_down.weight" not in leaves:
            return _rejected("invokeai", keys, f"layer {stem!r} has no lora_down.weight: InvokeAI raises KeyError")
    result = LoaderResult("invokeai")
    skipped = []
    for stem, leaves in groups.items():
        for prefix, tree, kind in (("lora_unet_", names.unet_tree, UNET), ("lora_te_", names.text_encoder_tree, TEXT_ENCODER)):
            if stem.startswith(prefix):
                path = _invoke_resolve(stem[len(prefix):], tree)
                if path is None or (path not in names.unet and path not in names.text_encoder):
                    return _rejected("invokeai", keys, f"{stem} resolves to no {kind[:-1]} module: InvokeAI raises when it patches the model")
                result.applied_modules.add(kind + path)
                if "alpha" not in leaves:
                    result.missing_alpha.append(kind + path)
                break
        else:
            skipped.extend(leaves.values())
    result.ignored_keys = sorted(skipped)
    if skipped:
        result.reason = f"{len(skipped)} keys have neither the lora_unet_ nor the lora_te_ prefix and are skipped silently"
    result.missing_alpha.sort()
    return result
