"""Reading SD 1.x LoRA files, whatever wrote them: the one reader every command uses.

Two levels:
- `read_header`: the safetensors header (names, shapes, dtypes, metadata) and the `.alpha` scalars,
  without torch and without the weights: fast on any file (`inspect`).
- `read_adapter`: the tensors grouped per model module, each module with its factors and the scale
  every loader applies to them (`convert`, `merge`, `resize`).

Namings (lora_offset.formats.loaders.parse_key tells them apart): kohya (`lora_unet_`, `lora_te_`,
`lora_te1_`, LDM-style `lora_unet_input_blocks_...`), diffusers (`unet.`, `text_encoder.`, also the
old `...processor.to_q_lora.down.weight`), PEFT adapter folders (`base_model.model.` weights beside
an adapter_config.json). The scale of a LoRA module:
- an `.alpha` key: alpha / rank;
- else diffusers' `lora_adapter_metadata` or PEFT's adapter_config.json: the scaling PEFT gives the
  module (alpha / r, / sqrt(r) under rsLoRA, rank_pattern / alpha_pattern applied);
- else 1.0: diffusers' and PEFT's convention without a config, and every kohya loader's without alpha.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from lora_offset.errors import UserError
from lora_offset.formats.modules import KINDS, LOHA_SUFFIXES, LOKR_SUFFIXES, AdapterModule, alpha_rank, module_kind

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers/loaders/lora_base.py LORA_ADAPTER_METADATA_KEY
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"

# --------------------------------------------------------------------------------------------
# The header only (no torch)


@dataclass
class LoraHeader:
    """The parts of a .safetensors LoRA file that can be read without loading the weights."""

    path: Path
    size: int
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    alphas: dict[str, float]  # key -> value of every "*.alpha" tensor


_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def read_header(path: str | os.PathLike, what: str = "inspect") -> LoraHeader:
    """Read a LoRA file's safetensors header and its alpha scalars; UserError naming the file otherwise.

    Parses the format directly (8-byte little-endian header length, JSON header, then the data
    section) so that neither torch nor the weights are loaded, and checks every tensor's byte range
    lies inside the file, which catches truncated downloads.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path}: no such file")
    size = path.stat().st_size
    bad = f"{what}: {path} is not a readable .safetensors file"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{bad} (only {size} bytes)")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 * 2**20):
                raise UserError(f"{bad} (header length {n} does not fit the {size}-byte file): not safetensors, or truncated")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            data_size = size - 8 - n
            shapes, dtypes, alphas = {}, {}, {}
            for key, info in header.items():
                start, end = info["data_offsets"]
                if end > data_size:
                    raise UserError(f"{bad}: tensor {key} ends at byte {end} of a {data_size}-byte data section; "
                                    "the file is truncated: download or copy it again")
                shapes[key] = tuple(int(d) for d in info["shape"])
                dtypes[key] = str(info["dtype"])
                if key.endswith(".alpha") and end > start:
                    f.seek(8 + n + start)
                    alphas[key] = _scalar(f.read(end - start), dtypes[key])
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise UserError(f"{bad} ({type(e).__name__}: {e})") from None
    if not shapes:
        raise UserError(f"{what}: {path} holds no tensors: not a LoRA file")
    return LoraHeader(path, size, {str(k): str(v) for k, v in metadata.items()}, shapes, dtypes, alphas)


def _scalar(data: bytes, dtype: str) -> float:
    """First element of a little-endian tensor buffer as a float."""
    if dtype == "BF16":  # the top half of an IEEE float32
        return struct.unpack("<f", b"\x00\x00" + data[:2])[0]
    fmt = _SCALAR_FORMATS.get(dtype)
    if fmt is None:
        raise ValueError(f"alpha stored as unsupported dtype {dtype}")
    return float(struct.unpack_from(fmt, data)[0])


# --------------------------------------------------------------------------------------------
# PEFT folders and adapter configs


def resolve_weights(path: str | Path, what: str) -> tuple[Path, dict | None]:
    """(weights file, PEFT adapter_config or None) for a LoRA file or a PEFT adapter folder."""
    path = Path(path)
    if path.is_dir():
        path = path / PEFT_WEIGHTS
    config = None
    config_path = path.with_name(PEFT_CONFIG)
    if path.name == PEFT_WEIGHTS and config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{what}: {config_path} is not valid JSON ({e}): fix or remove it") from None
        if not isinstance(config, dict):
            raise UserError(f"{what}: {config_path} is not a PEFT adapter config (a JSON object)")
    return path, config


def adapter_configs(metadata: Mapping[str, str], peft_config: dict | None, what: str = "convert"
                    ) -> dict[str, dict | None]:
    """LoraConfig fields per component ("unet", "text_encoder"); None where the file carries none."""
    configs: dict[str, dict | None] = {"unet": None, "text_encoder": None}
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw:
        try:
            packed = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{what}: the file's {ADAPTER_METADATA_KEY} is not valid JSON ({e})") from None
        for component in configs:
            fields = {k[len(component) + 1:]: v for k, v in packed.items() if k.startswith(f"{component}.")}
            configs[component] = fields or None
    if peft_config is not None:  # a PEFT folder holds one model's adapter: it applies to whichever that is
        configs = {component: configs[component] or dict(peft_config) for component in configs}
    return configs


def _pattern_value(patterns: dict, names: list[str], default):
    # PEFT (peft/utils/other.py get_pattern_key): a pattern key applies to a module whose name ends
    # with it at a "." boundary; the first matching key wins.
    for key, value in (patterns or {}).items():
        if any(re.match(rf"(.*\.)?({key})$", name) for name in names):
            return value
    return default


def peft_scale(config: dict, module_names: list[str], rank: int, where: str, what: str = "convert") -> float:
    """The scaling PEFT gives a module under `config` (lora/layer.py update_layer)."""
    if config.get("use_dora"):
        raise UserError(f"{what}: {where} is a DoRA adapter (use_dora); DoRA cannot be written as a kohya LoRA")
    if config.get("lora_bias"):
        raise UserError(f"{what}: {where} has a LoRA bias (lora_bias); kohya LoRA files cannot hold it")
    r = int(_pattern_value(config.get("rank_pattern"), module_names, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module_names, config.get("lora_alpha", 8)))
    if r != rank:
        raise UserError(f"{what}: {where}: the adapter config says rank {r} but the weights have rank {rank}; "
                        "the config does not belong to these weights")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# --------------------------------------------------------------------------------------------
# The tensors, per module (lora_offset.formats.modules.AdapterModule)


@dataclass
class AdapterFile:
    """A LoRA file read whole: its modules keyed by (component, path), its metadata and origin."""

    path: Path
    metadata: dict[str, str]
    modules: dict[tuple[str, str], AdapterModule]
    key_styles: collections.Counter = field(default_factory=collections.Counter)
    dtypes: set = field(default_factory=set)  # torch dtypes of the weight tensors

    @property
    def scale_sources(self) -> collections.Counter:
        return collections.Counter(m.scale_from for m in self.modules.values())


def read_adapter(path: str | Path, what: str, *, allow_pickle: bool = False, names=None) -> AdapterFile:
    """Read an SD 1.x LoRA file (or PEFT adapter folder) whole; every problem is one UserError naming it.

    Pickled files (.ckpt/.pt/.bin) are read only with `allow_pickle` (and `weights_only=True`).
    """
    from lora_offset.formats import checkpoint

    weights, peft_config = resolve_weights(path, what)
    if weights.suffix.lower() in checkpoint.PICKLE_SUFFIXES:
        if not weights.is_file():
            raise UserError(f"{what}: {weights}: no such file")
        tensors, metadata = checkpoint.read_state_dict(weights, allow_pickle=allow_pickle), {}
    else:
        import safetensors.torch

        metadata = read_header(weights, what=what).metadata  # UserError for a missing, foreign or truncated file
        tensors = safetensors.torch.load_file(str(weights))
    modules, styles = parse_adapter(tensors, metadata, peft_config, str(weights), what, names)
    return AdapterFile(weights, metadata, modules, styles, {t.dtype for t in tensors.values()})


def parse_adapter(tensors: Mapping, metadata: Mapping[str, str], peft_config: dict | None, source: str,
                  what: str, names=None) -> tuple[dict[tuple[str, str], AdapterModule], collections.Counter]:
    """Group any-format SD 1.x LoRA tensors per module, with each module's scale. No I/O.

    Returns ({(component, path): AdapterModule}, Counter of key styles). `names` are the model's
    module names (default: SD 1.5's, lora_offset.formats.loaders.sd15_model_names).
    """
    from lora_offset.formats import loaders

    names = names or loaders.sd15_model_names()
    if any(k.startswith("lora_te2_") for k in tensors):
        raise UserError(f"{what}: {source}: is an SDXL LoRA (lora_te2_ keys); lora-offset reads SD 1.x LoRAs only")
    entries: dict[tuple[str, str], dict] = {}
    styles = collections.Counter()
    known = {"down", "up", "alpha", *LOHA_SUFFIXES, *LOKR_SUFFIXES}
    for key, tensor in tensors.items():
        if key.endswith((".lora_A.bias", ".lora_B.bias")):
            raise UserError(f"{what}: {source}: {key!r} is a LoRA bias, which kohya LoRA files cannot hold")
        if "magnitude_vector" in key or key.endswith(".dora_scale"):
            raise UserError(f"{what}: {source}: {key!r} is a DoRA magnitude; DoRA cannot be written as a kohya LoRA")
        parsed = loaders.parse_key(key, names)
        if parsed is None:
            raise UserError(f"{what}: {source}: key {key!r} names no SD 1.x UNet or text-encoder module; "
                            "is this an SD 1.x LoRA?")
        if parsed.role not in known:
            raise UserError(f"{what}: {source}: {key!r} ({parsed.role}) is not a LoRA, LoHa or LoKr weight "
                            "(other LyCORIS types, bias and norm keys are not read)")
        entry = entries.setdefault((parsed.component, parsed.module), {})
        if parsed.role in entry:
            raise UserError(f"{what}: {source}: {key!r} and {entry[parsed.role][0]!r} are the same weight of "
                            f"{parsed.module} under two names")
        entry[parsed.role] = (key, tensor)
        styles[parsed.style] += 1

    configs = adapter_configs(metadata, peft_config, what)
    modules: dict[tuple[str, str], AdapterModule] = {}
    for (component, module), entry in sorted(entries.items()):
        where = f"{what}: {source}: module {component}.{module}"
        alpha = float(entry["alpha"][1].float().reshape(-1)[0]) if "alpha" in entry else None
        kind = module_kind(entry)
        if kind is None:
            raise UserError(f"{where} mixes LoRA, LoHa or LoKr weights in one module")
        if kind == "lora":
            modules[(component, module)] = _lora_module(component, module, entry, alpha, configs, where, source, what)
        else:
            factors = {s: entry[s][1].float() for s in KINDS[kind] if s in entry}
            modules[(component, module)] = _lycoris_module(component, module, kind, factors, alpha, where)
    if not modules:
        raise UserError(f"{what}: {source}: has no LoRA weights")
    return modules, styles


def _lora_module(component, module, entry, alpha, configs, where, source, what) -> AdapterModule:
    if "down" not in entry or "up" not in entry:
        raise UserError(f"{where} has no {'lora_down/lora_A' if 'down' not in entry else 'lora_up/lora_B'} weight")
    down, up = entry["down"][1].float(), entry["up"][1].float()
    rank = down.shape[0]
    if up.dim() < 2 or up.shape[1] != rank:
        raise UserError(f"{what}: {source}: {entry['up'][0]!r} has shape {tuple(up.shape)}, which does not fit "
                        f"its lora_down of rank {rank}")
    if alpha is not None:
        scale, how = alpha / rank, "alpha key"
    elif configs[component] is not None:
        variants = [module, module.removeprefix("text_model.")] if component == "text_encoder" else [module]
        scale = peft_scale(configs[component], variants, rank, f"{source} {component}.{module}", what)
        how = "adapter config"
    else:
        scale, how = 1.0, "none: scale 1.0"
    return AdapterModule.lora(component, module, down, up, scale, how)


def _lycoris_module(component: str, module: str, kind: str, factors: dict, alpha: float | None, where: str
                    ) -> AdapterModule:
    """A LoHa / LoKr module with the scale A1111, ComfyUI and Forge apply (formats/loaders/*: the oracles)."""
    if kind == "loha":
        missing = [s for s in LOHA_SUFFIXES[:4] if s not in factors]
        if missing or ("hada_t1" in factors) != ("hada_t2" in factors):
            raise UserError(f"{where} is a LoHa module without {', '.join(missing) or 'both hada_t1 and hada_t2'}")
    else:
        for side in ("1", "2"):
            if f"lokr_w{side}" not in factors and not {f"lokr_w{side}_a", f"lokr_w{side}_b"} <= set(factors):
                raise UserError(f"{where} is a LoKr module without lokr_w{side} (or lokr_w{side}_a and _b)")
    dim = alpha_rank(kind, {suffix: tuple(f.shape) for suffix, f in factors.items()})
    try:
        candidate = AdapterModule(component, module, kind, factors, 1.0, "", alpha)
        candidate.delta()
    except RuntimeError as e:
        raise UserError(f"{where} has {kind} factors that do not fit together ({e})") from None
    if dim is None:
        scale, how = 1.0, "LoKr without a low-rank factor: 1.0"
    elif alpha is None:
        scale, how = 1.0, "none: scale 1.0"
    else:
        scale, how = alpha / dim, "alpha key"
    return AdapterModule(component, module, kind, factors, scale, how, alpha)
