"""SD 1.x module names as the LoRA loaders see them, and reading any SD 1.x LoRA key: pure, no I/O.

`ModelNames` holds the UNet's diffusers and LDM module paths and the CLIP text encoder's paths;
`parse_key` tells which module a key of any naming (kohya, LDM-style kohya, diffusers, PEFT)
belongs to. The diffusers -> LDM module map is derived from diffusers' own single-file converter
(see the package docstring).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from lora_offset.formats.keys import normalize_text_encoder_name

UNET = "unet."
TEXT_ENCODER = "text_encoder."


@dataclass(frozen=True, eq=False)  # hashed by identity: the lru_caches below key on it
class ModelNames:
    """Module names of one SD 1.x model, as the loaders see them.

    unet: diffusers module paths of UNet modules that own a `.weight` ("down_blocks.0.resnets.0.conv1").
    unet_ldm: diffusers path -> LDM path under `diffusion_model.` ("input_blocks.1.0.in_layers.2").
    text_encoder: CLIP paths with the `text_model.` level ("text_model.encoder.layers.0.mlp.fc1").
    diffusers_kohya: kohya module key -> module id, for the keys diffusers' own kohya converter
        (`_convert_unet_lora_key` / `_convert_text_encoder_lora_key`) turns into a module of this model.
    text_model_optional: the installed CLIPTextModel has no `text_model.` level (transformers 5), so
        diffusers strips it from LoRA keys and accepts both spellings.
    """

    unet: frozenset[str]
    unet_ldm: Mapping[str, str]
    text_encoder: frozenset[str]
    diffusers_kohya: Mapping[str, str]
    text_model_optional: bool

    @functools.cached_property
    def unet_tree(self) -> frozenset[str]:
        """Every module path in the UNet, containers included (what `get_submodule` can reach)."""
        return _all_prefixes(self.unet)

    @functools.cached_property
    def text_encoder_tree(self) -> frozenset[str]:
        return _all_prefixes(self.text_encoder)

    @functools.cached_property
    def flat_index(self) -> dict[str, tuple[str, str, str]]:
        """{kohya module key: (component, module path, style)} for every kohya naming some loader accepts."""
        return _flat_index(self.unet_ldm, self.text_encoder)

    def to_json(self) -> str:
        return json.dumps({"unet_ldm": dict(sorted(self.unet_ldm.items())), "text_encoder": sorted(self.text_encoder),
                           "diffusers_kohya": dict(sorted(self.diffusers_kohya.items())),
                           "text_model_optional": self.text_model_optional})

    @classmethod
    def from_json(cls, text: str) -> "ModelNames":
        d = json.loads(text)
        return cls(frozenset(d["unet_ldm"]), d["unet_ldm"], frozenset(d["text_encoder"]), d["diffusers_kohya"],
                   bool(d["text_model_optional"]))


def _all_prefixes(paths: Iterable[str]) -> frozenset[str]:
    out = set()
    for p in paths:
        parts = p.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(out)


def _flat(path: str) -> str:
    return path.replace(".", "_")


# ----------------------------------------------------------------------------- model names

def derive_unet_ldm_map(unet_weight_keys: Iterable[str], layers_per_block: int, up_block_types: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> LDM module path.

    The names come from `ldm.propose_ldm_unet_key` (the LDM block layout, checked there
    against diffusers' own `convert_ldm_unet_checkpoint`); real SD 1.x files put the upsamplers at
    `output_blocks.2.1`, `.5.2` and `.8.2`. `check_unet_ldm_map` proves the result with the converter.
    """
    from lora_offset.formats.ldm import propose_ldm_unet_key

    with_attention = {i for i, t in enumerate(up_block_types) if "CrossAttn" in t}
    return {key.rsplit(".", 1)[0]: propose_ldm_unet_key(key, layers_per_block, with_attention).rsplit(".", 1)[0]
            for key in unet_weight_keys}


def check_unet_ldm_map(unet, ldm_map: Mapping[str, str]) -> None:
    """Prove `ldm_map` with diffusers' own converter: raise AssertionError on any disagreement.

    Builds a fake LDM checkpoint (`model.diffusion_model.<ldm path>.<param>` = a unique number),
    converts it with `convert_ldm_unet_checkpoint` and checks every diffusers parameter comes back
    with its own number.
    """
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    params = list(unet.state_dict().keys())
    fake = {}
    for i, key in enumerate(params):
        path, leaf = key.rsplit(".", 1)
        fake[f"model.diffusion_model.{ldm_map[path]}.{leaf}"] = torch.tensor([float(i)])
    converted = convert_ldm_unet_checkpoint(fake, dict(unet.config))
    assert set(converted) == set(params), sorted(set(converted) ^ set(params))[:10]
    for i, key in enumerate(params):
        assert converted[key].item() == float(i), f"{key} came back from the wrong LDM key"


def model_names(unet, text_encoder) -> ModelNames:
    """ModelNames of an in-memory diffusers UNet and transformers CLIPTextModel (meta tensors are fine)."""
    from diffusers.loaders.lora_conversion_utils import _convert_text_encoder_lora_key, _convert_unet_lora_key

    weight_keys = [k for k in unet.state_dict() if k.endswith(".weight")]
    ldm = derive_unet_ldm_map(weight_keys, unet.config.layers_per_block, unet.config.up_block_types)
    te = {normalize_text_encoder_name(k.rsplit(".", 1)[0]) for k in text_encoder.state_dict() if k.endswith(".weight")}
    text_model_optional = not hasattr(text_encoder, "text_model")
    te_lookup = {(_strip_text_model(t) if text_model_optional else t): t for t in te}
    resolved = {}
    for stem, (component, _, _) in _flat_index(ldm, te).items():
        if component == "unet":
            path = _converted_module(_convert_unet_lora_key(f"{stem}.lora_down.weight"), text_encoder=False)
            if path in ldm:
                resolved[stem] = UNET + path
        else:
            path = _converted_module(_convert_text_encoder_lora_key(f"{stem}.lora_down.weight", stem), text_encoder=True)
            target = te_lookup.get(_strip_text_model(path) if text_model_optional else path)
            if target:
                resolved[stem] = TEXT_ENCODER + target
    return ModelNames(frozenset(ldm), ldm, frozenset(te), resolved, text_model_optional)


def _cached_names(kind: str, build) -> ModelNames:
    """ModelNames from a JSON cache keyed by the diffusers/transformers versions, else `build()` and cache.

    Building needs diffusers and transformers imported (seconds); `lora-offset inspect` should not
    pay that on every call. A cache that cannot be written is simply skipped.
    """
    from importlib.metadata import version

    from lora_offset.fileio import atomic_write_text

    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-offset"
    # Keyed by this file's own contents too, so a change to the derivation never meets a stale cache.
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    cache = cache_root / f"{kind}-names-{code}-diffusers{version('diffusers')}-transformers{version('transformers')}.json"
    try:
        return ModelNames.from_json(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError):
        pass
    names = build()
    try:
        atomic_write_text(cache, names.to_json())
    except OSError:
        pass
    return names


@functools.lru_cache(maxsize=None)
def sd15_model_names(use_cache: bool = True) -> ModelNames:
    """Full-size SD 1.5 names, built on the meta device (no memory, no download)."""
    def build():
        from lora_offset.sd15 import build_sd15

        return model_names(build_sd15("unet", device="meta"), build_sd15("text_encoder", device="meta"))

    return _cached_names("sd15", build) if use_cache else build()


@functools.lru_cache(maxsize=None)
def tiny_model_names() -> ModelNames:
    """Names of lora_offset.tiny's model (SD 1.5's module paths, less one conv_shortcut; narrow widths)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_offset.tiny import TINY_TEXT_ENCODER_CONFIG, TINY_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG))
    return model_names(unet, text_encoder)


def _converted_module(name: str, text_encoder: bool) -> str:
    """Module path PEFT patches for a key in diffusers' spellings (`..attn1.processor.to_q_lora.down.weight`,
    `..proj_in.lora.down.weight`, `..mlp.fc1.lora_linear_layer.down.weight`, PEFT `..lora_A.weight`);
    the renames of diffusers/utils/state_dict_utils.py `convert_state_dict_to_peft`."""
    for suffix in (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", ".lora.down.weight",
                   ".lora.up.weight", "_lora.down.weight", "_lora.up.weight", ".lora_A.weight", ".lora_B.weight",
                   ".lora_A.bias", ".lora_B.bias", ".lora_magnitude_vector"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = name.replace(".processor.", ".")
    if text_encoder:
        for old, new in ((".to_q", ".q_proj"), (".to_k", ".k_proj"), (".to_v", ".v_proj"), (".to_out", ".out_proj")):
            if name.endswith(old):
                name = name[: -len(old)] + new
    elif name.endswith(".to_out"):
        name += ".0"
    return name


def _strip_text_model(path: str) -> str:
    return path.removeprefix("text_model.")


# ----------------------------------------------------------------------------- reading any SD 1.x LoRA key

@dataclass(frozen=True)
class ParsedKey:
    """One key of an SD 1.x LoRA file, whatever its naming.

    component: "unet" or "text_encoder"; module: diffusers path (UNet) or "text_model." path (CLIP);
    role: "down" (lora_down / lora_A), "up" (lora_up / lora_B), "alpha", or the raw suffix otherwise;
    style: "kohya", "kohya-ldm" (lora_unet_ + LDM path), "kohya-te1", "kohya-no-text_model",
    "diffusers" (dotted unet./text_encoder.), "peft" (base_model.model.) or "dotted" (no prefix).
    """

    component: str
    module: str
    role: str
    style: str


_ROLE_SUFFIXES = (  # (suffix, role); longest spellings first
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)


def _flat_index(unet_ldm: Mapping[str, str], text_encoder: Iterable[str]) -> dict[str, tuple[str, str, str]]:
    index: dict[str, tuple[str, str, str]] = {}
    for d, ldm in unet_ldm.items():
        index[f"lora_unet_{_flat(ldm)}"] = ("unet", d, "kohya-ldm")
    for d in unet_ldm:
        index[f"lora_unet_{_flat(d)}"] = ("unet", d, "kohya")
    for t in text_encoder:
        index[f"lora_te_{_flat(_strip_text_model(t))}"] = ("text_encoder", t, "kohya-no-text_model")
        index[f"lora_te1_{_flat(t)}"] = ("text_encoder", t, "kohya-te1")
        index[f"lora_te_{_flat(t)}"] = ("text_encoder", t, "kohya")
    return index


def parse_key(key: str, names: ModelNames) -> ParsedKey | None:
    """Which module of `names` a LoRA key belongs to, and as what; None if it names no SD 1.x module."""
    if key.startswith(("lora_unet_", "lora_te")):  # kohya: module = text before the first "."
        stem, _, rest = key.partition(".")
        role = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up",
                "lora_B.weight": "up", "alpha": "alpha"}.get(rest, rest)
        hit = names.flat_index.get(stem)
        return ParsedKey(hit[0], hit[1], role, hit[2]) if hit else None
    role, stem = None, key
    for suffix, r in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            role, stem = r, key[: -len(suffix)]
            break
    if role is None:
        return None
    for prefix, style in (("unet.", "diffusers"), ("text_encoder.", "diffusers"), ("base_model.model.", "peft"), ("", "dotted")):
        if not stem.startswith(prefix):
            continue
        path = stem[len(prefix):]
        if prefix != "text_encoder.":
            unet_path = _converted_module(path + ".lora_A.weight", text_encoder=False)
            if unet_path in names.unet:
                return ParsedKey("unet", unet_path, role, style)
        if prefix != "unet.":
            te_path = _converted_module(path + ".lora_A.weight", text_encoder=True)
            te = {_strip_text_model(t): t for t in names.text_encoder}.get(_strip_text_model(te_path))
            if te:
                return ParsedKey("text_encoder", te, role, style)
        return None
    return None
