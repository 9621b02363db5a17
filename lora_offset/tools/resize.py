"""`lora-offset resize IN OUT`: shrink a LoRA's rank by SVD, as kohya's networks/resize_lora.py does.

    lora-offset resize big.safetensors small.safetensors --rank 8
    lora-offset resize big.safetensors small.safetensors --dynamic sv_fro --param 0.9 [--rank 32]

Per module, the delta up @ down (convolutions flattened) is factored by SVD and cut to the best
rank-k approximation (Eckart–Young: the error is the norm of the dropped singular values):
up' = U_k S_k, down' = V_k^T, and the module keeps its scale alpha / r, so alpha' = k * scale.
k is --rank (--conv-rank for 3x3 convolutions), or chosen per module by kohya's dynamic methods
(lowrank.dynamic_rank), with --rank / --conv-rank as the cap; never above the module's own rank
(a larger k would only add zero singular values). One alpha is written for the file as the
exporter does: modules whose alpha' differs carry the ratio in up' (diffusers needs one alpha).
The input's ss_* metadata is kept, with the new dims, the settings in `ss_training_comment` and
`lora_offset.resize`, and new sshs_* hashes. IN may be any LoRA file `inspect` reads.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_offset import lowrank
from lora_offset.arguments import RANK_MAX, Number, OutputPath
from lora_offset.errors import UserError
from lora_offset.formats.modules import AdapterModule
from lora_offset.formats.reader import read_adapter

PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Resized:
    """One module after resizing: its new factors (scale unchanged) and what the cut kept."""

    key: str
    down: torch.Tensor  # [k, in] or [k, in, kh, kw]
    up: torch.Tensor  # [out, k] or [out, k, 1, 1]
    scale: float
    old_rank: int
    rank: int
    frobenius_kept: float  # share of the delta's Frobenius norm kept
    error: float  # Frobenius norm of the dropped part of the delta: scale * sqrt(sum of dropped s^2)


def is_conv3x3(module: AdapterModule) -> bool:
    return module.down.dim() == 4 and tuple(module.down.shape[2:]) != (1, 1)


def resize_module(module: AdapterModule, max_rank: int, method: str | None = None, param: float | None = None
                  ) -> Resized:
    """The best rank-k approximation of one LoRA module: k = max_rank, or kohya's dynamic choice capped by it."""
    u, s, vh = lowrank.factored_svd(module.up, module.down)
    out_features, in_flat = module.up.shape[0], module.down[0].numel()
    if method is None:
        rank = max_rank
    else:
        # kohya counts on the delta's whole spectrum: min(out, in) values, the exact zeros included.
        full = torch.zeros(min(out_features, in_flat), dtype=s.dtype)
        full[: s.numel()] = s
        rank = lowrank.dynamic_rank(full, method, param, max_rank)
    rank = max(1, min(rank, module.rank, s.numel()))
    up, down = lowrank.truncate(u, s, vh, rank)
    up = up.float().reshape(out_features, rank, *([1, 1] if module.up.dim() == 4 else []))
    down = down.float().reshape(rank, *module.down.shape[1:])
    return Resized(module.kohya_key, down, up, module.scale, module.rank, rank,
                   lowrank.frobenius_kept(s, rank), abs(module.scale) * lowrank.dropped_norm(s, rank))


def resize_modules(modules, rank: int | None, conv_rank: int | None, method: str | None, param: float | None
                   ) -> list[Resized]:
    """Resize every module; `rank`/`conv_rank` None means no cap beyond the module's own rank."""
    out = []
    for module in modules:
        cap = conv_rank if is_conv3x3(module) and conv_rank is not None else rank
        out.append(resize_module(module, cap if cap is not None else module.rank, method, param))
    return out


def check_settings(rank: int | None, conv_rank: int | None, method: str | None, param: float | None) -> None:
    if rank is None and method is None:
        raise UserError("resize: give --rank R, or --dynamic METHOD --param P")
    for name, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise UserError(f"resize: {name} {value}: a rank is a whole number >= 1")
    if method is not None and param is None:
        raise UserError(f"resize: --dynamic {method} needs --param P")
    if method is None and param is not None:
        raise UserError("resize: --param only applies with --dynamic")
    if method == "sv_ratio" and not param >= 1:
        raise UserError(f"resize: --param {param}: sv_ratio keeps singular values within a factor P of the largest; "
                        "P must be >= 1 (e.g. 4)")
    if method in ("sv_cumulative", "sv_fro") and not 0 < param <= 1:
        raise UserError(f"resize: --param {param}: {method} keeps a share of the spectrum; P must be in (0, 1] (e.g. 0.9)")


def resize_file(src: str | Path, dst: str | Path, *, rank: int | None = None, conv_rank: int | None = None,
                method: str | None = None, param: float | None = None, precision: str | None = None
                ) -> list[Resized]:
    """Resize the LoRA file IN into OUT (atomic write); return the resized modules."""
    from lora_offset.formats.kohya import precision_of, save_lora, uniform_alpha_tensors
    from lora_offset.formats.kohya_metadata import derived_metadata

    check_settings(rank, conv_rank, method, param)
    adapter = read_adapter(src, "resize")
    dst = Path(dst)
    if dst.resolve() == adapter.path.resolve():
        raise UserError(f"resize: output {dst} is the input file: choose another path")
    if dst.suffix != ".safetensors":
        raise UserError(f"resize: output {dst} must end in .safetensors")
    lycoris = [m for m in adapter.modules.values() if m.kind != "lora"]
    if lycoris:
        raise UserError(f"resize: {adapter.path}: {len(lycoris)} modules are {lycoris[0].kind} (e.g. {lycoris[0].kohya_key}); "
                        "resize works on plain LoRA, whose delta is one low-rank product. To get a LoRA of rank R "
                        "from it: lora-offset merge --lora IN --out OUT --rank R")
    resized = resize_modules(adapter.modules.values(), rank, conv_rank, method, param)
    state, file_alpha, _ = uniform_alpha_tensors([(r.key, r.down, r.up, r.rank, r.scale) for r in resized])

    old = max(r.old_rank for r in resized)
    settings = {"rank": rank, "conv_rank": conv_rank, "dynamic": method, "param": param}
    if method is None:
        conv = f" (conv: {conv_rank})" if conv_rank is not None and conv_rank != rank else ""
        comment, dims = f"dimension is resized from {old} to {rank}{conv}", rank
    else:
        comment, dims = f"Dynamic resize with {method}: {param} from {old}", "Dynamic"
    ranks = {r.rank for r in resized}
    metadata = derived_metadata(adapter.metadata, output_name=dst.stem,
                                network_dim=dims if len(ranks) > 1 or method else ranks.pop(),
                                network_alpha=file_alpha, comment=comment,
                                extra={"lora_offset.resize": json.dumps(settings)})
    save_lora(dst, state, metadata, precision=precision or precision_of(adapter.dtypes))
    return resized


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="LoRA file (kohya, diffusers or PEFT)")
    parser.add_argument("output", metavar="OUT", type=OutputPath("file"), help="resized kohya LoRA .safetensors to write")
    parser.add_argument("--rank", type=Number(int, 1, RANK_MAX),
                        help="new rank; with --dynamic, the largest rank a module may keep")
    parser.add_argument("--conv-rank", type=Number(int, 1, RANK_MAX),
                        help="new rank (or cap) of the 3x3 convolution modules (default: as --rank)")
    parser.add_argument("--dynamic", choices=lowrank.DYNAMIC_METHODS,
                        help="choose each module's rank from its singular values, as kohya's resize_lora.py: "
                        "sv_ratio (values within a factor P of the largest), sv_cumulative (share P of their sum), "
                        "sv_fro (share P of the Frobenius norm)")
    # Each method's own range is checked with the method (check_settings); this bounds them all.
    parser.add_argument("--param", type=Number(float, 0, 10000, low_open=True,
                                               why="sv_ratio takes P >= 1, sv_cumulative and sv_fro P <= 1"),
                        help="P of the --dynamic method")
    parser.add_argument("--precision", choices=PRECISIONS, help="tensor precision of OUT (default: that of IN)")
    parser.add_argument("--verbose", action="store_true", help="print each module's new rank and the share of its "
                        "Frobenius norm kept")


def run(args: argparse.Namespace) -> int:
    resized = resize_file(args.input, args.output, rank=args.rank, conv_rank=args.conv_rank, method=args.dynamic,
                          param=args.param, precision=args.precision)
    if args.verbose:
        width = max(len(r.key) for r in resized)
        for r in resized:
            print(f"{r.key:<{width}}  rank {r.old_rank:>3} -> {r.rank:<3}  Frobenius norm kept {r.frobenius_kept:7.2%}")
    kept = [r.frobenius_kept for r in resized]
    ranks = sorted({r.rank for r in resized})
    shown = ", ".join(str(k) for k in ranks) if len(ranks) <= 6 else f"{ranks[0]}..{ranks[-1]}"
    print(f"wrote {args.output}: {len(resized)} modules at rank {shown}; Frobenius norm kept: mean "
          f"{sum(kept) / len(kept):.2%}, lowest {min(kept):.2%}")
    return 0
