"""What each SD 1.x LoRA loader would do with a file: key-matching oracles, pure functions, no I/O.

Each `match_<loader>(keys, names)` re-implements one loader's documented key-matching rule (cited
per function: file and function in that loader's source) and returns a `LoaderResult`: which model
modules the LoRA would patch, which keys the loader would drop, and whether it refuses the file
outright. `names` (`ModelNames`) are the SD 1.x module names the loader resolves keys against:
the UNet's diffusers module paths, their LDM (original Stable Diffusion) paths, and the CLIP text
encoder's paths. Module ids in results are "unet.<diffusers path>" and
"text_encoder.text_model.<path>" whatever naming the file used, so results of different loaders
compare directly.

The diffusers -> LDM module map is derived from diffusers' own single-file converter
(`convert_ldm_unet_checkpoint`): `derive_unet_ldm_map` takes lora_offset.formats.ldm's LDM names, and
`check_unet_ldm_map` runs the real converter on a fake LDM state dict to prove the inverse. The
map of each loader (A1111's regexes, ComfyUI's tables) is then checked against it, not against
itself.

Modules: names.py (ModelNames, parse_key), result.py (LoaderResult), one module per loader
(a1111.py, comfyui.py with Forge, invokeai.py, diffusers.py); this package exposes them together.

LyCORIS LoHa and LoKr modules (`hada_*`, `lokr_*` keys) are matched by A1111, ComfyUI, Forge and
InvokeAI as by the loaders' code; `a1111_weight_delta` and `comfyui_weight_delta` compute the delta
each applies to a weight (the scale rules differ per type). Other LyCORIS types are not modelled.
"""

from __future__ import annotations

from typing import Iterable

from lora_offset.formats.loaders.a1111 import a1111_convert_name, a1111_weight_delta, match_a1111
from lora_offset.formats.loaders.comfyui import comfyui_weight_delta, match_comfyui, match_forge
from lora_offset.formats.loaders.diffusers import match_diffusers
from lora_offset.formats.loaders.invokeai import match_invokeai
from lora_offset.formats.loaders.names import (TEXT_ENCODER, UNET, ModelNames, ParsedKey, _flat, check_unet_ldm_map,
                                               derive_unet_ldm_map, model_names, parse_key, sd15_model_names,
                                               tiny_model_names)
from lora_offset.formats.loaders.result import KOHYA_PREFIXES, LORA_PAIRS, LoaderResult, _first_dot

__all__ = ["KOHYA_PREFIXES", "LORA_PAIRS", "LOADERS", "LOADER_TITLES", "TEXT_ENCODER", "UNET", "LoaderResult",
           "ModelNames", "ParsedKey", "a1111_convert_name", "a1111_weight_delta", "comfyui_weight_delta", "check_unet_ldm_map", "derive_unet_ldm_map",
           "file_modules", "match", "match_a1111", "match_all", "match_comfyui", "match_diffusers", "match_forge",
           "match_invokeai", "model_names", "parse_key", "sd15_model_names", "tiny_model_names"]

LOADERS = {
    "a1111": match_a1111,
    "forge": match_forge,
    "comfyui": match_comfyui,
    "invokeai": match_invokeai,
    "diffusers": match_diffusers,
}
LOADER_TITLES = {"a1111": "AUTOMATIC1111", "forge": "Forge", "comfyui": "ComfyUI", "invokeai": "InvokeAI",
                 "diffusers": "diffusers load_lora_weights"}


def match(loader: str, keys: Iterable[str], names: ModelNames) -> LoaderResult:
    return LOADERS[loader](keys, names)


def match_all(keys: Iterable[str], names: ModelNames) -> dict[str, LoaderResult]:
    keys = list(keys)
    return {name: fn(keys, names) for name, fn in LOADERS.items()}


def file_modules(keys: Iterable[str], names: ModelNames) -> set[str]:
    """Module ids a kohya-format file means to patch (what a fully compatible loader applies)."""
    kohya_unet = {f"lora_unet_{_flat(d)}": UNET + d for d in names.unet}
    kohya_te = {f"lora_te_{_flat(t)}": TEXT_ENCODER + t for t in names.text_encoder}
    out = set()
    for key in keys:
        module, _ = _first_dot(key)
        target = kohya_unet.get(module) or kohya_te.get(module)
        if target:
            out.add(target)
    return out
