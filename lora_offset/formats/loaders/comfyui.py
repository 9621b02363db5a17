"""The ComfyUI and Forge oracles (Forge uses ComfyUI's key maps and loader)."""

from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping

from lora_offset.formats.loaders.names import TEXT_ENCODER, UNET, ModelNames, _flat
from lora_offset.formats.loaders.result import LOHA_KEYS, LoaderResult, _rejected, _uses_alpha

_LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}


@functools.lru_cache(maxsize=16)
def _comfy_key_map(names: ModelNames, generic_clip_keys: bool) -> dict[str, str]:
    """ComfyUI comfy/lora.py `model_lora_keys_unet` + `model_lora_keys_clip` for an SD 1.x model (clip_l)."""
    key_map: dict[str, str] = {}
    for d, ldm in names.unet_ldm.items():
        target = UNET + d
        key_map[f"lora_unet_{_flat(ldm)}"] = target           # LDM-style kohya names
        key_map[f"diffusion_model.{ldm}"] = target             # "generic lora format"
        key_map[f"lora_unet_{_flat(d)}"] = target              # diffusers-style kohya names (unet_to_diffusers)
        key_map[f"lycoris_{_flat(d)}"] = target
        for prefix in ("", "unet."):                            # old diffusers attn-processor names
            k = prefix + d.replace(".to_", ".processor.to_")
            key_map[k[:-2] if k.endswith(".to_out.0") else k] = target
    for t in names.text_encoder:
        target = TEXT_ENCODER + t
        r = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", t)
        if r and r.group(2) in _LORA_CLIP_MAP and int(r.group(1)) < 32:
            b, c = r.group(1), r.group(2)
            key_map[f"lora_te_text_model_encoder_layers_{b}_{_LORA_CLIP_MAP[c]}"] = target
            key_map[f"lora_te1_text_model_encoder_layers_{b}_{_LORA_CLIP_MAP[c]}"] = target
            key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = target
        if generic_clip_keys:
            key_map[f"text_encoders.clip_l.transformer.{t}"] = target
    return key_map


_LOKR_KEYS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# comfy/lora.py `load_lora`: (up, down) spellings it tries per mapped module, in order.
_COMFY_FORMS = (("lora_up.weight", "lora_down.weight", "."), ("lora.up.weight", "lora.down.weight", "_"),
                ("lora_B.weight", "lora_A.weight", "."), ("lora.up.weight", "lora.down.weight", "."),
                ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight", "."))


def _comfy_load(keys: list[str], key_map: Mapping[str, str]) -> tuple[set[str], set[str], list[str], str]:
    """(applied module ids, loaded keys, modules missing alpha, error) as comfy/lora.py `load_lora` does it."""
    keyset = set(keys)
    applied, loaded, no_alpha = set(), set(), []
    for x, target in key_map.items():
        alpha = f"{x}.alpha"
        if alpha in keyset:
            loaded.add(alpha)
        for up, down, sep in _COMFY_FORMS:
            up_key, down_key = f"{x}{sep}{up}", f"{x}{sep}{down}"
            if up_key in keyset:
                if down_key not in keyset:  # lora[B_name] -> KeyError: the load fails
                    return set(), set(), [], f"{up_key} has no {down_key}: the loader raises KeyError"
                applied.add(target)
                loaded.update({up_key, down_key})
                if sep == "." and up == "lora_up.weight" and alpha not in keyset:
                    no_alpha.append(target)
                break
        # LyCORIS (weight_adapter/loha.py, lokr.py `load`; Forge's comfyui_lora_collection/lora.py):
        # hada_w1_a makes a LoHa, which then reads its three other factors (KeyError if one is
        # missing); any of lokr_w1, lokr_w2, lokr_w1_a, lokr_w2_a makes a LoKr of whatever is there.
        if f"{x}.hada_w1_a" in keyset:
            names = [f"{x}.{k}" for k in LOHA_KEYS]
            if f"{x}.hada_t1" in keyset:
                names += [f"{x}.hada_t1", f"{x}.hada_t2"]
            missing = [k for k in names if k not in keyset]
            if missing:
                return set(), set(), [], f"{missing[0]} is missing beside {x}.hada_w1_a: the loader raises KeyError"
            applied.add(target)
            loaded.update(names)
            if alpha not in keyset:
                no_alpha.append(target)
        lokr = {k for k in _LOKR_KEYS if f"{x}.{k}" in keyset}
        if lokr & {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"}:
            applied.add(target)
            loaded.update(f"{x}.{k}" for k in lokr)
            if alpha not in keyset and _uses_alpha(lokr):
                no_alpha.append(target)
    return applied, loaded, sorted(no_alpha), ""


def match_comfyui(keys: Iterable[str], names: ModelNames) -> LoaderResult:
    """ComfyUI comfy/lora.py: `model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`.

    Accepts `lora_unet_` with diffusers- or LDM-style paths, `lora_te_`/`lora_te1_` with
    `text_model_encoder_layers_<n>_<q/k/v/out_proj|mlp_fc1/2>`, dotted `text_encoder.text_model...`,
    and dotted `unet.` paths only in the old attn-processor spelling (`attn1.processor.to_q`): PEFT-style
    `unet....attn1.to_q.lora_A.weight` keys match no entry. Each key not loaded gets a warning
    ("lora key not loaded"), the rest applies. No alpha: alpha/r is replaced by 1.0. Metadata unused.
    """
    keys = list(keys)
    applied, loaded, no_alpha, error = _comfy_load(keys, _comfy_key_map(names, True))
    if error:
        return _rejected("comfyui", keys, error)
    ignored = sorted(set(keys) - loaded)
    reason = f"{len(ignored)} keys not loaded (a warning each), the rest applies" if ignored else ""
    return LoaderResult("comfyui", applied, ignored, False, reason, no_alpha)


def match_forge(keys: Iterable[str], names: ModelNames) -> LoaderResult:
    """Forge extensions-builtin/sd_forge_lora/networks.py `load_lora_for_models`, with ComfyUI's key maps
    (packages_3rdparty/comfyui_lora_collection/lora.py `model_lora_keys_unet/clip`, `load_lora`).

    Keys left after the UNet and CLIP passes are "unmatched"; more than 12 and Forge prints
    "LoRA version mismatch" and skips the whole LoRA; 1 to 12 are listed and the rest applies.
    """
    keys = list(keys)
    applied, loaded, no_alpha, error = _comfy_load(keys, _comfy_key_map(names, False))
    if error:
        return _rejected("forge", keys, error)
    unmatched = sorted(set(keys) - loaded)
    if len(unmatched) > 12:
        return _rejected("forge", keys, f"{len(unmatched)} unmatched keys (> 12): Forge skips the whole LoRA ('LoRA version mismatch')")
    reason = f"{len(unmatched)} unmatched keys listed and dropped, the rest applies" if unmatched else ""
    return LoaderResult("forge", applied, unmatched, False, reason, no_alpha)


def comfyui_weight_delta(weights: Mapping, weight_shape: tuple[int, ...]):
    """What ComfyUI (and Forge, whose backend/patcher/lora.py `merge_lora_to_weight` has the same code)
    adds to a weight of `weight_shape` for one module's tensors {suffix: tensor}, at strength 1, in
    float64; None where the loader logs an error and skips the module (e.g. a 4-D hada_w1_b: torch.mm).

    LoRA: weight_adapter/lora.py, torch.mm of the flattened up and down, scale alpha / down's rows.
    LoHa: weight_adapter/loha.py, torch.mm(w1_a, w1_b) * torch.mm(w2_a, w2_b), scale alpha / w1_b's rows.
    LoKr: weight_adapter/lokr.py, kron(w1, w2) (w1 unsqueezed for a 4-D w2), scale alpha / dim with dim
    = w1_b's rows when w1 is not stored whole, overwritten by w2_b's when w2 is not: 1.0 without alpha
    or dim. Each result is reshaped to the weight. The Tucker forms are not modelled.
    """
    import math

    import torch

    w = {k: v.double() for k, v in weights.items()}
    alpha = float(w["alpha"]) if "alpha" in w else None
    try:
        if "lora_up.weight" in w:
            up, down = w["lora_up.weight"], w["lora_down.weight"]
            dim, diff = down.shape[0], torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))
        elif "hada_w1_a" in w:
            dim = w["hada_w1_b"].shape[0]
            diff = torch.mm(w["hada_w1_a"], w["hada_w1_b"]) * torch.mm(w["hada_w2_a"], w["hada_w2_b"])
        else:
            dim = None
            if "lokr_w1" in w:
                w1 = w["lokr_w1"]
            else:
                dim, w1 = w["lokr_w1_b"].shape[0], torch.mm(w["lokr_w1_a"], w["lokr_w1_b"])
            if "lokr_w2" in w:
                w2 = w["lokr_w2"]
            else:
                dim, w2 = w["lokr_w2_b"].shape[0], torch.mm(w["lokr_w2_a"], w["lokr_w2_b"])
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            diff = torch.kron(w1, w2)
        if diff.numel() != math.prod(weight_shape):
            return None
    except RuntimeError:
        return None
    return diff.reshape(weight_shape) * (alpha / dim if alpha is not None and dim is not None else 1.0)
