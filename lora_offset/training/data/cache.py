"""The latent cache: every (image, size, flip) a batch can use, encoded once, in memory or on disk, with the
image's loss mask at each size (masks.py) when its subset has one."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Callable

import torch

from lora_offset.fileio import atomic_path
from lora_offset.training.data.buckets import Size
from lora_offset.training.data.images import one_line

log = logging.getLogger("lora_offset.data")
LATENT_FACTOR = 8
_CACHE_FORMAT = "lora_offset.latents.v1"


def encode_latents(dataset, encode: Callable[[torch.Tensor], torch.Tensor], cache_dir: Path | str | None = None,
                   *, encoder_id: str = "", batch_size: int = 4
                   ) -> tuple[dict[tuple[int, Size, bool], torch.Tensor], dict[tuple[int, Size], torch.Tensor]]:
    """Encode every (image, size, flip) a batch of `dataset` can use, once: ({(entry, size, flip): latent},
    {(entry, size): mask (1, H/8, W/8), not flipped} for the images with a mask).

    `encode` maps float32 (N, 3, H, W) in [-1, 1] (CPU) to latents (N, 4, H/8, W/8), VAE scaling
    applied. Instance images are encoded at their bucket, class images at every instance bucket;
    both flips when the subset has flip_aug, with the subset's resize_interpolation. With `cache_dir`, one
    safetensors file per image (and mask file) is reused while the image's (and its mask file's) mtime and
    size and `encoder_id` (say, the VAE's path) are unchanged.
    """
    sizes = list(dataset.bucket_counts)
    needed: dict[int, list[tuple[Size, bool]]] = {}
    for i, entry in enumerate(dataset.entries):
        flips = (False, True) if dataset.subsets[entry.subset].flip_aug else (False,)
        entry_sizes = sizes if entry.is_reg else [entry.bucket]
        needed[i] = [(s, f) for s in entry_sizes for f in flips]
    latents: dict[tuple[int, Size, bool], torch.Tensor] = {}
    masks: dict[tuple[int, Size], torch.Tensor] = {}
    folder = Path(cache_dir) if cache_dir is not None else None
    dirty: set[int] = set()
    pending: dict[Size, list[tuple[tuple[int, Size, bool], torch.Tensor]]] = {}

    def flush(size: Size) -> None:
        jobs = pending.pop(size, [])
        if not jobs:
            return
        with torch.no_grad():
            out = encode(torch.stack([px for _, px in jobs]))
        expected = (len(jobs), 4, size[1] // LATENT_FACTOR, size[0] // LATENT_FACTOR)
        if tuple(out.shape) != expected:
            raise ValueError(f"encode returned shape {tuple(out.shape)}, expected {expected}")
        for (key, _), latent in zip(jobs, out.detach().to("cpu", torch.float32)):
            latents[key] = latent.clone()

    reused = 0
    for i, wanted in needed.items():
        found = _read_cache_file(dataset, folder, i, encoder_id) if folder is not None else {}
        interpolation = dataset.subsets[dataset.entries[i].subset].resize_interpolation
        with_mask = dataset.entries[i].mask is not None or dataset.subsets[dataset.entries[i].subset].alpha_mask
        missing = []
        for size, flip in wanted:
            name = _latent_name(size, flip, interpolation)
            mask_name = _latent_name(size, False, interpolation) + "_mask"
            if name in found and (not with_mask or mask_name in found):
                latents[(i, size, flip)] = found[name]
                if with_mask:
                    masks[(i, size)] = found[mask_name]
                reused += 1
            else:
                missing.append((size, flip))
        if not missing:
            continue
        dirty.add(i)
        samples = dataset.render(i, sorted({s for s, _ in missing}))
        for size, flip in missing:
            px, mask = samples[size]
            if mask is not None:
                masks[(i, size)] = mask
            pending.setdefault(size, []).append(((i, size, flip), px.flip(-1) if flip else px))
            if len(pending[size]) >= batch_size:
                flush(size)
    for size in list(pending):
        flush(size)
    if folder is not None:
        for i in sorted(dirty):
            _write_cache_file(dataset, folder, i, encoder_id, latents, masks)
    total = sum(len(w) for w in needed.values())
    log.info("cached %d latents (%d reused from %s)", total, reused, folder if folder is not None else "-")
    return latents, masks


def _cache_file(dataset, folder: Path, index: int) -> Path:
    path, mask = dataset.entries[index].path, dataset.entries[index].mask
    source = str(path.resolve()) + ("" if mask is None else f"|{mask.resolve()}")  # another mask, another file
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:40]
    return folder / f"{stem}-{digest}.safetensors"


def _source_stamp(dataset, index: int, encoder_id: str) -> dict[str, str]:
    path, mask = dataset.entries[index].path, dataset.entries[index].mask
    st = path.stat()
    stamp = {"format": _CACHE_FORMAT, "source": str(path.resolve()), "source_mtime_ns": str(st.st_mtime_ns),
             "source_size": str(st.st_size), "encoder_id": encoder_id}
    if mask is not None:
        mst = mask.stat()
        stamp.update({"mask": str(mask.resolve()), "mask_mtime_ns": str(mst.st_mtime_ns), "mask_size": str(mst.st_size)})
    return stamp


def _read_cache_file(dataset, folder: Path, index: int, encoder_id: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    file = _cache_file(dataset, folder, index)
    if not file.is_file():
        return {}
    try:
        with safe_open(str(file), framework="pt") as f:
            if f.metadata() != _source_stamp(dataset, index, encoder_id):
                return {}  # the image (or the VAE) changed since: encode again
            return {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:  # a damaged cache file is only a cache miss
        log.debug("ignoring latent cache file %s: %s", file, one_line(e))
        return {}


def _write_cache_file(dataset, folder: Path, index: int, encoder_id: str,
                      latents: dict[tuple[int, Size, bool], torch.Tensor],
                      masks: dict[tuple[int, Size], torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = _read_cache_file(dataset, folder, index, encoder_id)  # keep other sizes from other runs
    interpolation = dataset.subsets[dataset.entries[index].subset].resize_interpolation
    for (i, size, flip), latent in latents.items():
        if i == index:
            tensors[_latent_name(size, flip, interpolation)] = latent.contiguous()
    for (i, size), mask in masks.items():
        if i == index:
            tensors[_latent_name(size, False, interpolation) + "_mask"] = mask.contiguous()
    with atomic_path(_cache_file(dataset, folder, index)) as tmp:
        save_file(tensors, str(tmp), metadata=_source_stamp(dataset, index, encoder_id))


def _latent_name(size: Size, flip: bool, interpolation: str | None = None) -> str:
    return f"{size[0]}x{size[1]}" + (f"_{interpolation}" if interpolation else "") + ("_flip" if flip else "")
