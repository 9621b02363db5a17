"""`lora-offset convert IN OUT`: a diffusers- or PEFT-format SD 1.x LoRA -> our kohya format, same scale.

Inputs understood (lora_offset.formats.loaders.parse_key reads every naming):
- diffusers' `save_lora_weights` files: `unet.<module>.lora_A.weight` / `text_encoder.<module>...`
  (also the older `...processor.to_q_lora.down.weight` spellings), kohya keys mixed in or not;
- PEFT's own `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`) with its
  `adapter_config.json` beside it (IN may be that file or its folder);
- kohya keys in any spelling (`lora_te1_`, LDM-style `lora_unet_input_blocks_…`, CLIP keys without
  `text_model_`): renamed to the one spelling every loader accepts.

The scale each module had in its trainer is kept:
- kohya keys: alpha / rank from their `.alpha` key;
- diffusers files: the `lora_adapter_metadata` JSON (diffusers >= 0.35 writes the LoraConfig there
  as "unet.lora_alpha", "unet.rank_pattern", ...), PEFT folders: adapter_config.json; per module
  scale = alpha / r with PEFT's rank_pattern / alpha_pattern lookup, alpha / sqrt(r) under rsLoRA;
- neither: diffusers' and PEFT's convention without a config is W + B @ A, i.e. scale 1.0, so
  alpha = r is written (made explicit, so that every kohya loader gives the same result).
Like our exporter, one alpha is written for the whole file (the most common alpha) and modules whose
scale differs carry it in lora_up: diffusers mis-scales files whose alphas differ between modules.
DoRA (`lora_magnitude_vector`), LoRA bias and LyCORIS keys cannot be written as plain kohya LoRA: refused.
"""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

from lora_offset.errors import UserError
from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers/loaders/lora_base.py LORA_ADAPTER_METADATA_KEY
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


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


def read_input(path: str | Path) -> tuple[dict, dict[str, str], dict | None, Path]:
    """(tensors, safetensors metadata, PEFT adapter_config or None, weights file) of IN."""
    import safetensors.torch

    from lora_offset.tools.inspect import read_header

    path, config = resolve_weights(path, "convert")
    header = read_header(path, what="convert")  # UserError for a missing, foreign or truncated file
    return safetensors.torch.load_file(str(path)), header.metadata, config, path


def adapter_configs(metadata: dict[str, str], peft_config: dict | None) -> dict[str, dict | None]:
    """LoraConfig fields per component ("unet", "text_encoder"); None where the file carries none."""
    configs: dict[str, dict | None] = {"unet": None, "text_encoder": None}
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw:
        try:
            packed = json.loads(raw)
        except ValueError as e:
            raise UserError(f"convert: the file's {ADAPTER_METADATA_KEY} is not valid JSON ({e})") from None
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


def peft_scale(config: dict, module_names: list[str], rank: int, where: str) -> float:
    """The scaling PEFT gives a module under `config` (lora/layer.py update_layer)."""
    if config.get("use_dora"):
        raise UserError(f"convert: {where} is a DoRA adapter (use_dora); DoRA cannot be written as a kohya LoRA")
    if config.get("lora_bias"):
        raise UserError(f"convert: {where} has a LoRA bias (lora_bias); kohya LoRA files cannot hold it")
    r = int(_pattern_value(config.get("rank_pattern"), module_names, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module_names, config.get("lora_alpha", 8)))
    if r != rank:
        raise UserError(f"convert: {where}: the adapter config says rank {r} but the weights have rank {rank}; "
                        "the config does not belong to these weights")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def convert_state_dict(tensors: dict, metadata: dict[str, str], peft_config: dict | None, source: str,
                       names=None) -> tuple[dict, dict]:
    """Kohya state dict (fp32, one alpha) for any-format SD 1.x LoRA tensors, and a summary of what was done."""
    import torch

    from lora_offset.formats import loaders

    names = names or loaders.sd15_model_names()
    modules: dict[tuple[str, str], dict] = {}
    styles = collections.Counter()
    for key, tensor in tensors.items():
        if key.endswith((".lora_A.bias", ".lora_B.bias")):
            raise UserError(f"convert: {source}: {key!r} is a LoRA bias, which kohya LoRA files cannot hold")
        if "magnitude_vector" in key or key.endswith(".dora_scale"):
            raise UserError(f"convert: {source}: {key!r} is a DoRA magnitude; DoRA cannot be written as a kohya LoRA")
        parsed = loaders.parse_key(key, names)
        if parsed is None:
            raise UserError(f"convert: {source}: key {key!r} names no SD 1.x UNet or text-encoder module; "
                            "is this an SD 1.x LoRA?")
        if parsed.role not in ("down", "up", "alpha"):
            raise UserError(f"convert: {source}: {key!r} ({parsed.role}) is not a plain LoRA weight "
                            "(LyCORIS / LoRA bias keys cannot be converted)")
        entry = modules.setdefault((parsed.component, parsed.module), {})
        if parsed.role in entry:
            raise UserError(f"convert: {source}: {key!r} and {entry[parsed.role][0]!r} are the same weight of "
                            f"{parsed.module} under two names")
        entry[parsed.role] = (key, tensor)
        entry.setdefault("style", parsed.style)
        styles[parsed.style] += 1

    configs = adapter_configs(metadata, peft_config)
    scaled: list[tuple[str, torch.Tensor, torch.Tensor, int, float]] = []
    scale_sources = collections.Counter()
    for (component, module), entry in sorted(modules.items()):
        if "down" not in entry or "up" not in entry:
            missing = "lora_down/lora_A" if "down" not in entry else "lora_up/lora_B"
            raise UserError(f"convert: {source}: module {component}.{module} has no {missing} weight")
        down, up = entry["down"][1].float(), entry["up"][1].float()
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise UserError(f"convert: {source}: {entry['up'][0]!r} has rank {up.shape[1]}, its lora_down {rank}")
        if "alpha" in entry:
            scale, how = float(entry["alpha"][1].float().reshape(-1)[0]) / rank, "alpha key"
        elif configs[component] is not None:
            variants = [module, module.removeprefix("text_model.")] if component == "text_encoder" else [module]
            scale = peft_scale(configs[component], variants, rank, f"{source} {component}.{module}")
            how = "adapter config"
        else:
            scale, how = 1.0, "none: scale 1.0"
        scale_sources[how] += 1
        prefix = UNET_PREFIX if component == "unet" else TEXT_ENCODER_PREFIX
        scaled.append((kohya_name(prefix, module), down, up, rank, scale))

    from lora_offset.formats.kohya import uniform_alpha_tensors

    out, file_alpha, folded = uniform_alpha_tensors(scaled)  # each module keeps its own scale
    ranks = collections.Counter(rank for _, _, _, rank, _ in scaled)
    summary = {
        "modules": len(scaled),
        "unet_modules": sum(c == "unet" for c, _ in modules),
        "text_encoder_modules": sum(c == "text_encoder" for c, _ in modules),
        "input_key_styles": dict(styles),
        "scale_from": dict(scale_sources),
        "network_dim": ranks.most_common(1)[0][0],
        "network_alpha": file_alpha,
        "folded_into_lora_up": folded,
    }
    return out, summary


def conversion_metadata(summary: dict, output_name: str, source_name: str) -> dict[str, str]:
    def number(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else repr(float(x))

    styles = ", ".join(f"{s} ({n})" for s, n in sorted(summary["input_key_styles"].items()))
    scales = ", ".join(f"{s} ({n})" for s, n in sorted(summary["scale_from"].items()))
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(summary["network_dim"]),
        "ss_network_alpha": number(summary["network_alpha"]),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": output_name,
        "ss_training_comment": f"converted by lora-offset from {source_name}: keys {styles}; scale from {scales}",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": output_name,
    }


def convert_file(src: str | Path, dst: str | Path, precision: str | None = None) -> dict:
    """Convert IN to a kohya LoRA at OUT (atomic write). Returns the conversion summary."""
    from lora_offset.formats.kohya import save_lora

    tensors, metadata, peft_config, weights = read_input(src)
    dst = Path(dst)
    if dst.resolve() == weights.resolve():
        raise UserError(f"convert: output {dst} is the input file: choose another path")
    if dst.suffix != ".safetensors":
        raise UserError(f"convert: output {dst} must end in .safetensors")
    state, summary = convert_state_dict(tensors, metadata, peft_config, str(weights))
    if precision is None:  # keep the input's precision (fp32 when it mixes several)
        by_torch = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
        dtypes = {by_torch.get(str(t.dtype).removeprefix("torch."), "fp32") for t in tensors.values()}
        precision = dtypes.pop() if len(dtypes) == 1 else "fp32"
    save_lora(dst, state, conversion_metadata(summary, dst.stem, weights.name), precision=precision)
    summary["precision"] = precision
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="diffusers/PEFT LoRA .safetensors, or a PEFT adapter folder")
    parser.add_argument("output", metavar="OUT", help="kohya-format LoRA .safetensors to write")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                        help="tensor precision of OUT (default: that of IN)")


def run(args) -> int:
    summary = convert_file(args.input, args.output, args.precision)
    print(f"wrote {args.output}: {summary['unet_modules']} UNet + {summary['text_encoder_modules']} text-encoder "
          f"modules, rank {summary['network_dim']}, alpha {summary['network_alpha']:g}, {summary['precision']}; "
          f"scale from {', '.join(f'{k} ({v})' for k, v in summary['scale_from'].items())}"
          + (f"; {summary['folded_into_lora_up']} modules carry their own scale in lora_up"
             if summary["folded_into_lora_up"] else ""))
    return 0
