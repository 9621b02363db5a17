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
(`convert_ldm_unet_checkpoint`): `derive_unet_ldm_map` takes checkpoint.py's LDM names, and
`check_unet_ldm_map` runs the real converter on a fake LDM state dict to prove the inverse. The
map of each loader (A1111's regexes, ComfyUI's tables) is then checked against it, not against
itself.

Not modelled: LyCORIS module types (LoHa, LoKr, ...), which the loaders accept under their own key
names; here such keys count as not understood.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from lora_offset.keys import normalize_text_encoder_name

UNET = "unet."
TEXT_ENCODER = "text_encoder."
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LORA_PAIRS = (  # (down/A key, up/B key) suffix spellings seen in SD 1.x LoRA files
    ("lora_down.weight", "lora_up.weight"),
    ("lora_A.weight", "lora_B.weight"),
)


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


@dataclass
class LoaderResult:
    """What one loader does with a LoRA file.

    applied_modules: module ids ("unet.<path>", "text_encoder.<path>") the loader patches.
    ignored_keys: keys the loader drops (silently or with a warning), sorted.
    whole_lora_rejected: the loader refuses the file or errors out: nothing applies.
    reason: one line on why keys were dropped or the file rejected ("" when all is well).
    missing_alpha: applied modules without an `.alpha` key: every loader then uses scale 1.0
        instead of alpha/rank, silently. Only meaningful for kohya-style files.
    """

    loader: str
    applied_modules: set[str] = field(default_factory=set)
    ignored_keys: list[str] = field(default_factory=list)
    whole_lora_rejected: bool = False
    reason: str = ""
    missing_alpha: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Everything in the file applies, at the scale it was trained with."""
        return not self.whole_lora_rejected and not self.ignored_keys and not self.missing_alpha and bool(self.applied_modules)


def _rejected(loader: str, keys: Iterable[str], reason: str) -> LoaderResult:
    return LoaderResult(loader, set(), sorted(keys), True, reason)


def _all_prefixes(paths: Iterable[str]) -> frozenset[str]:
    out = set()
    for p in paths:
        parts = p.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(out)


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _group(keys: Iterable[str], split) -> dict[str, dict[str, str]]:
    """{module part: {suffix part: full key}} with `split(key) -> (module, suffix)`."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        module, suffix = split(key)
        groups.setdefault(module, {})[suffix] = key
    return groups


def _first_dot(key: str) -> tuple[str, str]:
    module, _, suffix = key.partition(".")
    return module, suffix


def _lora_pair(suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    for down, up in LORA_PAIRS:
        if down in suffixes and up in suffixes:
            return down, up
    return None


# ----------------------------------------------------------------------------- model names

def derive_unet_ldm_map(unet_weight_keys: Iterable[str], layers_per_block: int, up_block_types: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> LDM module path.

    The names come from `checkpoint.propose_ldm_unet_key` (the LDM block layout, checked there
    against diffusers' own `convert_ldm_unet_checkpoint`); real SD 1.x files put the upsamplers at
    `output_blocks.2.1`, `.5.2` and `.8.2`. `check_unet_ldm_map` proves the result with the converter.
    """
    from lora_offset.checkpoint import propose_ldm_unet_key

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


# ----------------------------------------------------------------------------- AUTOMATIC1111

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


# ----------------------------------------------------------------------------- ComfyUI / Forge

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


# ----------------------------------------------------------------------------- InvokeAI

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


# ----------------------------------------------------------------------------- diffusers

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


# ----------------------------------------------------------------------------- all loaders

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
