"""`lora-offset merge`: bake LoRAs into an SD 1.x checkpoint (or, without --base, into one LoRA: merge_loras.py).

    lora-offset merge --base model.safetensors --lora a.safetensors:0.8 --lora b.safetensors:-0.3 --out merged.safetensors

For every LoRA'd module: W <- W + ratio * (alpha / r) * up @ down, computed in fp32 (convolutions
on flattened weights, then reshaped to W's shape); LoHa and LoKr modules add their own delta
(lowrank.loha_delta, lowrank.lokr_delta) at the scale the web UIs apply. BASE is a single-file LDM checkpoint or a
diffusers folder; the output keeps BASE's layout. Tensors no LoRA touches are copied
bit-identical and every tensor keeps its dtype, unless --precision casts all floating tensors.
A LoRA key that matches no module of BASE stops the merge: a half-applied LoRA is worse than none.
LoRA files are read by lora_offset.formats.reader: kohya files in any spelling, diffusers and PEFT files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lora_offset.arguments import RANK_MAX, FileAndNumber, Number, OutputPath, split_file_and_number
from lora_offset.errors import UserError
from lora_offset.formats import checkpoint
from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name
from lora_offset.formats.modules import AdapterModule
from lora_offset.formats.reader import read_adapter
from lora_offset.training import base_precision

log = logging.getLogger("lora_offset")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
METADATA_KEY = "lora_offset.merged_loras"
# A LoRA's ratio: negative ratios subtract it (kohya's merge takes them); no merge anyone means goes
# beyond +-100 (at 1e30 every weight the LoRA touches becomes inf).
RATIO = Number(float, -100, 100, why="a negative ratio subtracts the LoRA")


# --------------------------------------------------------------------------------------------
# Pure merge math


def merge_into_state_dict(
    base: dict[str, torch.Tensor],
    loras: Sequence[tuple[str, Mapping[str, AdapterModule], float]],
    targets: Mapping[str, str],
    precision: torch.dtype | None = None,
) -> set[str]:
    """Merge LoRAs into `base` in place; return the keys of the tensors changed.

    `loras` holds (name, {kohya module key: module}, ratio); `targets` maps each kohya module key to
    the key of its weight in `base`. Touched tensors are summed in fp32 and cast back to their own dtype
    (or to `precision`); with `precision`, every other floating tensor is cast too, else left as is.
    """
    unmatched = [f"{name}: {m}" for name, modules, _ in loras for m in modules if m not in targets]
    if unmatched:
        raise UserError(f"{len(unmatched)} LoRA modules match no weight of the base model (is it an SD 1.x LoRA?): "
                        f"{'; '.join(unmatched[:5])}")
    deltas: dict[str, torch.Tensor] = {}
    for name, modules, ratio in loras:
        for module_key, module in modules.items():
            weight_key = targets[module_key]
            weight = base[weight_key]
            delta = ratio * module.delta()  # LoRA, LoHa or LoKr: the delta every loader applies
            if delta.numel() != weight.numel():
                raise UserError(f"{name}: {module_key} has shape {tuple(delta.shape)} but the base weight "
                                f"{weight_key} is {tuple(weight.shape)}: the LoRA was trained on another model")
            delta = delta.reshape(weight.shape)
            deltas[weight_key] = deltas[weight_key] + delta if weight_key in deltas else delta
    for key, delta in deltas.items():
        dtype = precision or base[key].dtype
        base[key] = (base[key].float() + delta).to(dtype).contiguous()
    if precision is not None:
        for key, tensor in base.items():
            if key not in deltas and tensor.is_floating_point():
                base[key] = tensor.to(precision)
    return set(deltas)


def kohya_targets(unet_weights: Mapping[str, str], text_encoder_weights: Mapping[str, str]) -> dict[str, str]:
    """{kohya module key: base tensor key} from {diffusers parameter key: base tensor key} per model."""
    targets = {}
    for prefix, weights in ((UNET_PREFIX, unet_weights), (TEXT_ENCODER_PREFIX, text_encoder_weights)):
        for diffusers_key, base_key in weights.items():
            if diffusers_key.endswith(".weight"):
                targets[kohya_name(prefix, diffusers_key[: -len(".weight")])] = base_key
    return targets


def parse_lora_argument(value: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:RATIO' -> (path, ratio); a ':' not followed by a number belongs to the file name."""
    file, ratio = split_file_and_number(value)
    return Path(file), 1.0 if ratio is None else float(ratio)


def check_ratios(loras: Sequence[tuple[str | Path, float]]) -> None:
    """Every ratio finite and within RATIO's range (the command line checks it as it parses; this is for callers)."""
    for path, ratio in loras:
        try:
            RATIO(str(float(ratio)))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"merge: {path}: the ratio {e}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Files


def merge_checkpoint(base: str | Path, loras: Sequence[tuple[str | Path, float]], out: str | Path,
                     precision: str | None = None, allow_pickle: bool = False) -> set[str]:
    """Merge LoRA files (path, ratio) into BASE (LDM single file or diffusers folder), write OUT.

    Returns the keys of the tensors changed.
    """
    base, out = Path(base), Path(out)
    if not base.exists():
        raise UserError(f"{base}: no such file or folder")
    if not loras:
        raise UserError("no --lora given: nothing to merge")
    check_ratios(loras)
    if out.resolve() == base.resolve():
        raise UserError(f"{out}: --out must differ from --base (the base model is read while the output is written)")
    if base.is_dir() and base.resolve() in out.resolve().parents:
        raise UserError(f"{out}: --out must not be inside the --base folder {base}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS.get(precision) if precision else None
    # Output checks before any large file is read.
    if base.is_dir() and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists; choose a new --out folder or remove it")
    if not base.is_dir() and out.suffix.lower() != ".safetensors":
        raise UserError(f"{out}: a single-file base is written as one .safetensors file; end --out in .safetensors")

    parsed = []
    record = []
    for path, ratio in loras:
        adapter = read_adapter(path, "merge", allow_pickle=allow_pickle)
        path = adapter.path
        modules = {m.kohya_key: m for m in adapter.modules.values()}
        parsed.append((path.name, modules, float(ratio)))
        entry = source_record(adapter, ratio)
        if "trained_on_base_precision" in entry:
            log.warning("%s", base_precision.merge_note(path.name, entry["trained_on_base_precision"]))
        record.append(entry)
    # METADATA_KEY holds a list here: _output_metadata appends it to the base's own record.
    metadata = {"lora_offset.merge_precision": precision or "base", METADATA_KEY: record}
    if base.is_dir():
        return _merge_diffusers_folder(base, parsed, out, dtype, metadata)
    return _merge_single_file(base, parsed, out, dtype, metadata, allow_pickle)


def source_record(adapter, ratio: float) -> dict:
    """One merged LoRA as the output's METADATA_KEY list records it: file, sha256, ratio, its own
    sshs_model_hash, and the quantized base it trained against (if any)."""
    entry = {"file": adapter.path.name, "sha256": file_sha256(adapter.path), "ratio": float(ratio)}
    if adapter.metadata.get("sshs_model_hash"):
        entry["sshs_model_hash"] = adapter.metadata["sshs_model_hash"]
    if quantized := base_precision.quantized_base(adapter.metadata):
        entry["trained_on_base_precision"] = quantized
    return entry


def _output_metadata(base_metadata: Mapping[str, str], merge_metadata: Mapping[str, object]) -> dict[str, str]:
    """The base's metadata plus this merge's; a base merged before keeps its earlier LoRAs listed first."""
    meta = {**base_metadata, "format": "pt"}
    for key, value in merge_metadata.items():
        if key == METADATA_KEY:
            try:
                earlier = json.loads(base_metadata.get(METADATA_KEY, "[]"))
            except json.JSONDecodeError:
                earlier = []
            value = json.dumps((earlier if isinstance(earlier, list) else []) + list(value))
        meta[key] = value
    return meta


def _merge_single_file(base: Path, loras, out: Path, dtype, metadata: dict, allow_pickle: bool) -> set[str]:
    from safetensors.torch import save_file

    from lora_offset.fileio import atomic_write

    state = checkpoint.read_state_dict(base, allow_pickle=allow_pickle)
    checkpoint.require_sd1(state, base)
    # The map is derived from this file's own keys, so the merge writes exactly the names it has.
    key_map = checkpoint.ldm_map_of(state)
    touched = merge_into_state_dict(state, loras, kohya_targets(key_map["unet"], key_map["text_encoder"]), dtype)
    meta = _output_metadata(checkpoint.read_metadata(base), metadata)
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return touched


def _merge_diffusers_folder(base: Path, loras, out: Path, dtype, metadata: dict) -> set[str]:
    from safetensors.torch import load_file, save_file

    from lora_offset.fileio import atomic_write, check_readable

    files = {"unet": base / checkpoint.UNET_WEIGHTS, "text_encoder": base / checkpoint.TEXT_ENCODER_WEIGHTS}
    for component, path in files.items():
        if not path.is_file():
            raise UserError(f"{base}: diffusers folder has no {path.relative_to(base)} "
                            "(merging needs unsharded .safetensors weights for the UNet and text encoder)")
    states = {}
    for component, path in files.items():
        check_readable(path)  # a PermissionError stays one, rather than a "corrupt file"
        try:
            states[component] = load_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file, it may be truncated or corrupt: {e}") from None
    # Prefixing keeps the two models' tensors apart in one dict for the pure merge function.
    combined = {f"{c}/{k}": v for c, s in states.items() for k, v in s.items()}
    targets = kohya_targets({k: f"unet/{k}" for k in states["unet"]},
                            {k: f"text_encoder/{k}" for k in states["text_encoder"]})
    touched = merge_into_state_dict(combined, loras, targets, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        shutil.copytree(base, staging, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if Path(folder, n) in files.values()])
        for component, path in files.items():
            tensors = {k.split("/", 1)[1]: v for k, v in combined.items() if k.startswith(component + "/")}
            meta = _output_metadata(checkpoint.read_metadata(path), metadata)
            atomic_write(staging / path.relative_to(base), lambda tmp, t=tensors, m=meta: save_file(t, str(tmp), metadata=m))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return touched


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", metavar="PATH",
                        help="SD 1.x base model: single-file LDM checkpoint (.safetensors; .ckpt with --allow-pickle) or "
                        "diffusers folder; without --base the LoRAs are merged into one LoRA file")
    parser.add_argument("--lora", required=True, action="append", metavar="FILE[:RATIO]", type=FileAndNumber(RATIO),
                        help="LoRA file (kohya, diffusers or PEFT) and its ratio (default 1.0); repeat to merge several")
    parser.add_argument("--out", required=True, metavar="PATH", type=OutputPath("auto"),
                        help="output: a .safetensors file for a single-file base or without --base, "
                        "a new folder for a diffusers base")
    parser.add_argument("--precision", choices=sorted(PRECISIONS),
                        help="with --base: cast every floating tensor to this dtype (default: keep each tensor's dtype); "
                        "without: the LoRA's precision (default: the inputs')")
    parser.add_argument("--concat", action="store_true",
                        help="without --base: stack the LoRAs' ranks, an exact merge (the default)")
    parser.add_argument("--rank", type=Number(int, 1, RANK_MAX),
                        help="without --base: the best rank-R approximation of the sum (SVD)")
    parser.add_argument("--conv-rank", type=Number(int, 1, RANK_MAX),
                        help="without --base, with --rank: the rank of 3x3 convolution modules")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled .ckpt/.pt inputs (loaded with torch.load(weights_only=True)); only for files you trust")


def run(args: argparse.Namespace) -> int:
    loras = args.lora  # (path, ratio) pairs, checked by FileAndNumber
    names = ", ".join(f"{p.name}:{r:g}" for p, r in loras)
    if args.base is None:
        from lora_offset.tools.merge_loras import merge_lora_files

        if args.concat and args.rank is not None:
            raise UserError("merge: --concat and --rank exclude each other: --concat is exact, --rank R truncates by SVD")
        summary = merge_lora_files(loras, args.out, rank=args.rank, conv_rank=args.conv_rank, precision=args.precision,
                                   allow_pickle=args.allow_pickle)
        ranks = ", ".join(str(r) for r in sorted(summary["ranks"]))
        print(f"merged {names} into one LoRA, {summary['how']}: {summary['modules']} modules, rank {ranks}; "
              f"wrote {args.out}")
        return 0
    for flag, value in (("--concat", args.concat), ("--rank", args.rank), ("--conv-rank", args.conv_rank)):
        if value:
            raise UserError(f"merge: {flag} applies to merging LoRAs into one LoRA (without --base); "
                            "with --base every LoRA is added to the weights in full")
    touched = merge_checkpoint(args.base, loras, args.out, precision=args.precision, allow_pickle=args.allow_pickle)
    print(f"merged {names} into {len(touched)} weights; wrote {args.out}")
    return 0
