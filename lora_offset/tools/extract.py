"""`lora-offset extract --base A --tuned B --rank R OUT`: the LoRA that turns checkpoint A into B.

    lora-offset extract --base v1-5-pruned.safetensors --tuned my-finetune.safetensors --rank 32 my-finetune-lora.safetensors

For every LoRA target of kohya's SD 1.x network (the 192 UNet attention modules; with --conv-rank
also the ResNet 3x3 convolutions at that rank, their time_emb_proj and conv_shortcut at --rank,
and the samplers), the module's delta is the best rank-R approximation of B - A (SVD; convolutions
flattened), as kohya's extract_lora_from_models.py computes it. The text encoder's 72 modules are
included when some weight differs by more than --min-diff (kohya's rule: all or none). Modules
where B equals A exactly are left out. A and B are single-file checkpoints or diffusers folders, in
any mix. Unlike kohya (0.99) no quantile clamp is applied unless --clamp-quantile is given: the
clamp trades the SVD optimum for smaller extreme values.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from lora_offset import lowrank
from lora_offset.arguments import RANK_MAX, Number, OutputPath
from lora_offset.errors import UserError
from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name

PRECISIONS = ("fp16", "bf16", "fp32")


def target_weights(weights: dict[str, torch.Tensor], component: str, conv: bool) -> list[str]:
    """The weight keys of kohya's LoRA targets in one model's state dict (lora_offset.training.network_targets)."""
    from lora_offset.training import network_targets as targets

    if component == "text_encoder":
        patterns = [targets.TEXT_ENCODER_TARGETS]
    else:
        patterns = [targets.UNET_ATTENTION_TARGETS]
        if conv:
            patterns += [targets.UNET_CONV_3X3_TARGETS, targets.UNET_CONV_RANK_TARGETS]
    return [key for key in weights if key.endswith(".weight")
            and any(re.fullmatch(p, key.removesuffix(".weight")) for p in patterns)]


def extract_module(difference: torch.Tensor, rank: int, clamp_quantile: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the best rank-`rank` approximation of a weight difference, shaped as kohya LoRA factors."""
    u, s, vh = lowrank.dense_svd(difference)
    up, down = lowrank.truncate(u, s, vh, max(1, min(rank, s.numel())))
    if clamp_quantile is not None:
        up, down = lowrank.clamp_to_quantile(up, down, clamp_quantile)
    k = down.shape[0]
    conv = difference.dim() == 4
    return (down.float().reshape(k, *difference.shape[1:]),
            up.float().reshape(difference.shape[0], k, *([1, 1] if conv else [])))


def extract_file(base: str | Path, tuned: str | Path, out: str | Path, *, rank: int, conv_rank: int | None = None,
                 clamp_quantile: float | None = None, min_diff: float = 0.01, precision: str = "fp16",
                 allow_pickle: bool = False) -> dict:
    """Write the LoRA of `tuned` - `base` to OUT (atomic write); return a summary."""
    from lora_offset.formats import checkpoint
    from lora_offset.formats.kohya import save_lora, uniform_alpha_tensors
    from lora_offset.formats.kohya_metadata import derived_metadata

    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"extract: OUT {out} must end in .safetensors")
    for name, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise UserError(f"extract: {name} {value}: a rank is a whole number >= 1")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UserError(f"extract: --clamp-quantile {clamp_quantile} must be in (0, 1] (kohya uses 0.99)")
    if not 0 <= min_diff < float("inf"):
        raise UserError(f"extract: --min-diff {min_diff} must be a finite number >= 0")
    a = checkpoint.read_model_weights(base, allow_pickle=allow_pickle, what="extract")
    b = checkpoint.read_model_weights(tuned, allow_pickle=allow_pickle, what="extract")

    differences: dict[str, dict[str, torch.Tensor]] = {}
    for component in ("unet", "text_encoder"):
        differences[component] = {}
        for key in target_weights(a[component], component, conv_rank is not None):
            if key not in b[component] or b[component][key].shape != a[component][key].shape:
                raise UserError(f"extract: {component} weight {key} is missing from {tuned} or has another shape "
                                f"than in {base}: the two checkpoints are not the same SD 1.x architecture")
            differences[component][key] = b[component][key].float() - a[component][key].float()
    largest_te = max((float(d.abs().max()) for d in differences["text_encoder"].values()), default=0.0)
    text_encoder = largest_te > min_diff
    if not text_encoder:
        differences["text_encoder"] = {}

    modules, skipped = [], 0
    for component, prefix in (("unet", UNET_PREFIX), ("text_encoder", TEXT_ENCODER_PREFIX)):
        for key, difference in differences[component].items():
            if not difference.any():
                skipped += 1
                continue
            conv3x3 = difference.dim() == 4 and tuple(difference.shape[2:]) != (1, 1)
            down, up = extract_module(difference, conv_rank if conv3x3 else rank, clamp_quantile)
            modules.append((kohya_name(prefix, key.removesuffix(".weight")), down, up, int(down.shape[0]), 1.0))
    if not modules:
        raise UserError(f"extract: {tuned} and {base} have the same weights in every LoRA target: nothing to extract")
    state, file_alpha, _ = uniform_alpha_tensors(modules)
    settings = {"base": Path(base).name, "tuned": Path(tuned).name, "rank": rank, "conv_rank": conv_rank,
                "clamp_quantile": clamp_quantile, "min_diff": min_diff, "text_encoder": text_encoder}
    conv = f", conv rank {conv_rank}" if conv_rank is not None else ""
    metadata = derived_metadata({}, output_name=out.stem, network_dim=rank, network_alpha=file_alpha,
                                comment=f"extracted by lora-offset from {Path(tuned).name} - {Path(base).name}, "
                                f"rank {rank}{conv}",
                                extra={"lora_offset.extract": json.dumps(settings)})
    if conv_rank is not None:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))})
    save_lora(out, state, metadata, precision=precision)
    return {"modules": len(modules), "unet_modules": sum(m[0].startswith(UNET_PREFIX) for m in modules),
            "text_encoder_modules": sum(m[0].startswith(TEXT_ENCODER_PREFIX) for m in modules),
            "text_encoder": text_encoder, "largest_text_encoder_difference": largest_te, "skipped": skipped}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="A", help="the original SD 1.x model: single file or diffusers folder")
    parser.add_argument("--tuned", required=True, metavar="B", help="the fine-tuned model: single file or diffusers folder")
    parser.add_argument("--rank", required=True, type=Number(int, 1, RANK_MAX), help="LoRA rank of the extracted modules")
    parser.add_argument("--conv-rank", type=Number(int, 1, RANK_MAX),
                        help="also extract the ResNet and sampler convolutions, 3x3 ones at this rank")
    parser.add_argument("--clamp-quantile", type=Number(float, 0, 1, low_open=True),
                        help="clamp the factors to this quantile of their values, as kohya (default there: 0.99); "
                        "off by default: it trades the SVD optimum for smaller extreme values")
    # kohya's default is 0.01; a value above the largest difference (100 will do) leaves the text encoder out.
    parser.add_argument("--min-diff", type=Number(float, 0, 1000), default=0.01,
                        help="include the text encoder when one of its weights differs by more than this (default 0.01)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="tensor precision of OUT (default fp16)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled .ckpt inputs (loaded with torch.load(weights_only=True)); only for files you trust")
    parser.add_argument("output", metavar="OUT", type=OutputPath("file"), help="kohya LoRA .safetensors to write")


def run(args: argparse.Namespace) -> int:
    summary = extract_file(args.base, args.tuned, args.output, rank=args.rank, conv_rank=args.conv_rank,
                           clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, precision=args.precision,
                           allow_pickle=args.allow_pickle)
    te = (f"{summary['text_encoder_modules']} text-encoder" if summary["text_encoder"] else
          f"no text-encoder (largest difference {summary['largest_text_encoder_difference']:.3g} <= --min-diff)")
    print(f"wrote {args.output}: {summary['unet_modules']} UNet + {te} modules"
          + (f"; {summary['skipped']} unchanged modules left out" if summary["skipped"] else ""))
    return 0
