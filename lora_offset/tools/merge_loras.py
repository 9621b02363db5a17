"""`lora-offset merge --lora A:0.6 --lora B:0.4 --out C.safetensors` without `--base`: LoRAs into one LoRA.

Per module, the output's delta is the weighted sum of the inputs' deltas,
sum_i ratio_i * scale_i * up_i @ down_i (convolutions flattened):
- `--concat` (the default) is exact: the factors are stacked (lowrank.concat), so the module's rank
  is the sum of the input ranks of that module;
- `--rank R` (`--conv-rank R` for 3x3 convolutions) writes the best rank-R approximation of that sum:
  the SVD of the stacked factors is the SVD of the sum (lowrank.factored_svd), cut at R.
Inputs may differ in rank, alpha and modules (text encoder or conv modules in some only): a module
takes the inputs that have it. LoHa / LoKr modules merge with `--rank` only (their delta is not a
product of thin factors: the SVD of the summed delta). One alpha is written for the file, as the
exporter does.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Sequence

import torch

from lora_offset import lowrank
from lora_offset.errors import UserError
from lora_offset.formats.modules import AdapterModule
from lora_offset.formats.reader import AdapterFile, read_adapter


def merge_modules(loras: Sequence[tuple[AdapterFile, float]], rank: int | None = None, conv_rank: int | None = None
                  ) -> list[tuple[str, torch.Tensor, torch.Tensor, int, float]]:
    """(kohya key, down, up, rank, scale) per module of the merged LoRA: by concatenation, or SVD to `rank`."""
    by_module: dict[tuple[str, str], list[tuple[AdapterFile, AdapterModule, float]]] = collections.defaultdict(list)
    for adapter, ratio in loras:
        for where, module in adapter.modules.items():
            by_module[where].append((adapter, module, ratio))
    merged = []
    for (component, path), parts in sorted(by_module.items()):
        first_file, first, _ = parts[0]
        for adapter, module, _ in parts[1:]:
            if module.weight_shape != first.weight_shape:
                raise UserError(f"merge: {component}.{path} changes a {first.weight_shape} weight in {first_file.path} "
                                f"but a {module.weight_shape} weight in {adapter.path}: the LoRAs belong to different models")
        shape = first.weight_shape
        cap = conv_rank if conv_rank is not None and len(shape) == 4 and tuple(shape[2:]) != (1, 1) else rank
        lycoris = [m for _, m, _ in parts if m.kind != "lora"]
        if lycoris:
            if cap is None:
                raise UserError(f"merge: {component}.{path} is a {lycoris[0].kind} module: its factors cannot be "
                                "stacked with LoRA factors; pass --rank R to merge by SVD")
            # LoHa / LoKr deltas are full-rank in general: SVD of the summed dense delta.
            total = sum(ratio * m.weight_delta().double() for _, m, ratio in parts)
            u, s, vh = lowrank.dense_svd(total)
            stacked_up, stacked_down = None, None
        else:
            stacked_down, stacked_up = lowrank.concat([(m.down, m.up, ratio * m.scale) for _, m, ratio in parts])
            if cap is not None:
                u, s, vh = lowrank.factored_svd(stacked_up, stacked_down)
        if cap is None:
            down, up = stacked_down, stacked_up
        else:
            k = max(1, min(cap, s.numel()))
            new_up, new_down = lowrank.truncate(u, s, vh, k)
            up = new_up.float().reshape(shape[0], k, *([1, 1] if len(shape) == 4 else []))
            down = new_down.float().reshape(k, *shape[1:])
        merged.append((first.kohya_key, down, up, int(down.shape[0]), 1.0))
    return merged


def merge_lora_files(loras: Sequence[tuple[str | Path, float]], out: str | Path, *, rank: int | None = None,
                     conv_rank: int | None = None, precision: str | None = None, allow_pickle: bool = False) -> dict:
    """Merge LoRA files (path, ratio) into one kohya LoRA file OUT (atomic write); return a summary."""
    from lora_offset.formats.kohya import precision_of, save_lora, uniform_alpha_tensors
    from lora_offset.formats.kohya_metadata import derived_metadata
    from lora_offset.tools.merge import METADATA_KEY, check_ratios, source_record

    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"merge: --out {out}: a merged LoRA is one .safetensors file; end --out in .safetensors")
    if conv_rank is not None and rank is None:
        raise UserError("merge: --conv-rank needs --rank (without it the merge concatenates every module exactly)")
    for name, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise UserError(f"merge: {name} {value}: a rank is a whole number >= 1")
    check_ratios(loras)
    adapters = [(read_adapter(path, "merge", allow_pickle=allow_pickle), float(ratio)) for path, ratio in loras]
    for adapter, _ in adapters:
        if adapter.path.resolve() == out.resolve():
            raise UserError(f"merge: --out {out} is one of the input LoRAs: choose another path")
    modules = merge_modules(adapters, rank, conv_rank)
    state, file_alpha, _ = uniform_alpha_tensors(modules)

    record = [source_record(adapter, ratio) for adapter, ratio in adapters]
    quantized = [e["trained_on_base_precision"] for e in record if "trained_on_base_precision" in e]
    how = "concatenated (exact)" if rank is None else f"SVD to rank {rank}" + (f", conv {conv_rank}" if conv_rank else "")
    names = " + ".join(f"{a.path.name}:{r:g}" for a, r in adapters)
    versions = {a.metadata.get("ss_base_model_version") for a, _ in adapters}
    source = {"ss_base_model_version": versions.pop()} if len(versions) == 1 and None not in versions else {}
    if quantized:  # so `merge --base` of the merged file still warns; NF4 when mixed (the coarser rounding)
        source["lora_offset.base_precision"] = "nf4" if "nf4" in quantized else quantized[0]
    ranks = collections.Counter(m[3] for m in modules)
    metadata = derived_metadata(source, output_name=out.stem,
                                network_dim=ranks.most_common(1)[0][0] if len(ranks) == 1 else "Dynamic",
                                network_alpha=file_alpha, comment=f"merged by lora-offset: {names}, {how}",
                                extra={METADATA_KEY: json.dumps(record)})
    precision = precision or precision_of({d for a, _ in adapters for d in a.dtypes})
    save_lora(out, state, metadata, precision=precision)
    return {"modules": len(modules), "ranks": dict(ranks), "alpha": file_alpha, "how": how, "precision": precision}
