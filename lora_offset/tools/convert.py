"""`lora-offset convert IN OUT`: a diffusers- or PEFT-format SD 1.x LoRA -> our kohya format, same scale.

Inputs understood (read by lora_offset.formats.reader, which every command shares):
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
LoHa and LoKr modules (LyCORIS's `hada_*` / `lokr_*` keys) pass through unchanged under the one kohya
module-name spelling. DoRA (`lora_magnitude_vector`) and LoRA bias cannot be written as plain kohya
LoRA: refused.
"""

from __future__ import annotations

import collections
from pathlib import Path

from lora_offset.arguments import OutputPath
from lora_offset.errors import UserError
from lora_offset.formats.reader import AdapterFile, read_adapter


def convert_modules(adapter: AdapterFile) -> tuple[dict, dict]:
    """Kohya state dict (fp32) for a LoRA file read by `read_adapter`, and a summary of what was done.

    LoRA modules get one alpha for the file (a differing scale is folded into lora_up); LoHa and LoKr
    modules pass through under the kohya module name with their factors and alpha as stored.
    """
    import torch

    from lora_offset.formats.kohya import uniform_alpha_tensors

    modules = list(adapter.modules.values())
    lora = [m for m in modules if m.kind == "lora"]
    out, file_alpha, folded = {}, None, 0
    if lora:  # each module keeps its own scale
        out, file_alpha, folded = uniform_alpha_tensors([(m.kohya_key, m.down, m.up, m.rank, m.scale) for m in lora])
    for m in modules:
        if m.kind != "lora":
            out.update({f"{m.kohya_key}.{suffix}": factor.detach().float().clone() for suffix, factor in m.factors.items()})
            if m.alpha is not None:
                out[f"{m.kohya_key}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    ranks = collections.Counter(m.rank for m in modules if m.rank is not None)
    summary = {
        "modules": len(modules),
        "unet_modules": sum(m.component == "unet" for m in modules),
        "text_encoder_modules": sum(m.component == "text_encoder" for m in modules),
        "kinds": dict(collections.Counter(m.kind for m in modules)),
        "input_key_styles": dict(adapter.key_styles),
        "scale_from": dict(adapter.scale_sources),
        "network_dim": ranks.most_common(1)[0][0] if ranks else "full",
        "network_alpha": file_alpha if file_alpha is not None else
        collections.Counter(m.alpha for m in modules).most_common(1)[0][0],
        "folded_into_lora_up": folded,
    }
    return out, summary


def conversion_metadata(summary: dict, output_name: str, source_name: str, source_metadata: dict) -> dict[str, str]:
    from lora_offset.formats.kohya_metadata import derived_metadata

    styles = ", ".join(f"{s} ({n})" for s, n in sorted(summary["input_key_styles"].items()))
    scales = ", ".join(f"{s} ({n})" for s, n in sorted(summary["scale_from"].items()))
    lycoris = sorted(k for k in summary["kinds"] if k != "lora")
    return derived_metadata(source_metadata, output_name=output_name, network_dim=summary["network_dim"],
                            network_alpha=summary["network_alpha"] if summary["network_alpha"] is not None else "None",
                            network_module="lycoris.kohya" if lycoris else "networks.lora",
                            comment=f"converted by lora-offset from {source_name}: keys {styles}; scale from {scales}")


def convert_file(src: str | Path, dst: str | Path, precision: str | None = None) -> dict:
    """Convert IN to a kohya LoRA at OUT (atomic write). Returns the conversion summary."""
    from lora_offset.formats.kohya import precision_of, save_lora

    adapter = read_adapter(src, "convert")
    dst = Path(dst)
    if dst.resolve() == adapter.path.resolve():
        raise UserError(f"convert: output {dst} is the input file: choose another path")
    if dst.suffix != ".safetensors":
        raise UserError(f"convert: output {dst} must end in .safetensors")
    state, summary = convert_modules(adapter)
    precision = precision or precision_of(adapter.dtypes)
    save_lora(dst, state, conversion_metadata(summary, dst.stem, adapter.path.name, adapter.metadata), precision=precision)
    summary["precision"] = precision
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="diffusers/PEFT LoRA .safetensors, or a PEFT adapter folder")
    parser.add_argument("output", metavar="OUT", type=OutputPath("file"), help="kohya-format LoRA .safetensors to write")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                        help="tensor precision of OUT (default: that of IN)")


def run(args) -> int:
    summary = convert_file(args.input, args.output, args.precision)
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(summary["kinds"].items()))
    alpha = summary["network_alpha"]
    alpha = f"{alpha:g}" if isinstance(alpha, (int, float)) else alpha
    print(f"wrote {args.output}: {summary['unet_modules']} UNet + {summary['text_encoder_modules']} text-encoder "
          f"modules ({kinds}), rank {summary['network_dim']}, alpha {alpha}, {summary['precision']}; "
          f"scale from {', '.join(f'{k} ({v})' for k, v in summary['scale_from'].items())}"
          + (f"; {summary['folded_into_lora_up']} modules carry their own scale in lora_up"
             if summary["folded_into_lora_up"] else ""))
    return 0
