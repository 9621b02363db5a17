"""The diffusers oracle: what `StableDiffusionPipeline.load_lora_weights` does with a file's keys."""

from __future__ import annotations

import re
from typing import Iterable

from lora_offset.formats.loaders.names import TEXT_ENCODER, UNET, ModelNames, _converted_module, _strip_text_model
from lora_offset.formats.loaders.result import KOHYA_PREFIXES, LoaderResult, _first_dot, _group, _rejected

def match_diffusers(keys: Iterable[str], names: ModelNames) -> LoaderResult:
    """diffusers 0.42 `StableDiffusionPipeline.load_lora_weights` (loaders/lora_pipeline.py).

    `lora_state_dict`: only when EVERY key starts with lora_unet_/lora_te_/lora_te1_/lora_te2_ is the file
    read as kohya (lora_conversion_utils.py `_convert_non_diffusers_lora_to_diffusers`): each lora_down
    needs its lora_up (else KeyError), and any key left after taking down/up/alpha raises ValueError
    "keys have not been correctly renamed". Otherwise the file is read as diffusers/PEFT: every key must
    contain "lora" (else ValueError), and only keys under "unet." / "text_encoder." load (lora_base.py
    `_load_lora_into_text_encoder`, peft.py `load_lora_adapter` filter on the prefix): others, e.g.
    kohya keys mixed into a dotted file, are dropped silently. "text_model." is optional on the text
    encoder side (stripped when CLIPTextModel lacks that level). Alphas: kohya `.alpha` keys, or for
    dotted files the `lora_adapter_metadata`; without either the scale is 1.0.
    """
    keys = list(keys)
    unet_paths = names.unet
    optional = names.text_model_optional
    te_paths = {(_strip_text_model(t) if optional else t): t for t in names.text_encoder}
    result = LoaderResult("diffusers")
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        groups = _group(keys, _first_dot)
        unmatched = []
        for module, suffixes in groups.items():
            if "lora_down.weight" not in suffixes:
                return _rejected("diffusers", keys, f"{module} has {sorted(suffixes)} without lora_down.weight: "
                                 "diffusers raises 'keys have not been correctly renamed'")
            if "lora_up.weight" not in suffixes:
                return _rejected("diffusers", keys, f"{module} has no lora_up.weight: diffusers raises KeyError")
            extra = set(suffixes) - {"lora_down.weight", "lora_up.weight", "alpha"}
            if extra:
                return _rejected("diffusers", keys, f"{module} has {sorted(extra)}: diffusers raises 'keys have not been correctly renamed'")
            # names.diffusers_kohya was computed with diffusers' own converters; lora_te2_ (an SD 1.x
            # pipeline has no text_encoder_2) is never in it.
            target = names.diffusers_kohya.get(module)
            if target is None:
                unmatched.extend(suffixes.values())
                continue
            result.applied_modules.add(target)
            if "alpha" not in suffixes:
                result.missing_alpha.append(target)
        # diffusers/utils/state_dict_utils.py `convert_state_dict_to_diffusers` guesses the format of the
        # converted text-encoder dict from a "to_out_lora" key, i.e. an out_proj LoRA. Without one, a dict
        # that also has MLP keys ("lora_linear_layer") is taken as already converted, and the q/k/v keys
        # ("to_q_lora") stay unrenamed and are dropped silently; with attention keys only it raises
        # "Could not automatically infer state dict type".
        te_modules = {m for m in result.applied_modules if m.startswith(TEXT_ENCODER)}
        if te_modules and not any(m.endswith(".out_proj") for m in te_modules):
            qkv = {m for m in te_modules if re.search(r"\.self_attn\.[qkv]_proj$", m)}
            if qkv and qkv == te_modules:
                return _rejected("diffusers", keys, "text-encoder attention LoRA without out_proj: diffusers "
                                 "raises 'Could not automatically infer state dict type'")
            if qkv:
                result.applied_modules -= qkv
                dropped = [k for k in keys if names.diffusers_kohya.get(_first_dot(k)[0]) in qkv]
                unmatched.extend(dropped)
                result.missing_alpha = [m for m in result.missing_alpha if m not in qkv]
        for kind, prefixes in ((UNET, ("lora_unet_",)), (TEXT_ENCODER, ("lora_te_", "lora_te1_"))):
            has_keys = any(k.startswith(prefixes) for k in keys)
            if has_keys and not any(m.startswith(kind) for m in result.applied_modules):
                # peft raises NoMatchingPeftModuleError "Target modules ... not found in the base model"
                return _rejected("diffusers", keys, f"no {kind[:-1]} key names a module of this model: "
                                 "PEFT finds no target modules and raises")
        result.ignored_keys = sorted(unmatched)
        if unmatched:
            result.reason = (f"{len(unmatched)} keys dropped (modules this model lacks, or text-encoder q/k/v "
                             "without out_proj)")
        result.missing_alpha.sort()
        return result

    not_lora = [k for k in keys if "lora" not in k]
    if not_lora:
        return _rejected("diffusers", keys, f"{not_lora[0]!r} does not contain 'lora': diffusers raises 'Invalid LoRA checkpoint'")
    ignored = []
    for key in keys:
        target = None
        for prefix, kind in (("unet.", UNET), ("text_encoder.", TEXT_ENCODER)):
            if key.startswith(prefix):
                path = _converted_module(key[len(prefix):], text_encoder=kind == TEXT_ENCODER)
                if kind == UNET and path in unet_paths:
                    target = UNET + path
                elif kind == TEXT_ENCODER:
                    t = te_paths.get(_strip_text_model(path) if optional else path)
                    target = TEXT_ENCODER + t if t else None
                break
        if target is None:
            ignored.append(key)
        else:
            result.applied_modules.add(target)
    result.ignored_keys = sorted(ignored)
    if ignored:
        result.reason = f"{len(ignored)} keys are outside 'unet.'/'text_encoder.' or name no module: dropped silently"
    return result
