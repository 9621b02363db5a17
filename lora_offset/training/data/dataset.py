"""The dataset: scanned images and the deterministic batch schedule, a pure function of (seed, step).

A batch is drawn from one bucket of one dataset; each sample is the image cut to the bucket (centred,
or at random with random_crop), colour-jittered (color_aug), flipped (flip_aug), with its loss mask
(alpha_mask, conditioning_data_dir) cut, flipped and downscaled alike (augment.py, masks.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from lora_offset.errors import UserError
from lora_offset.training.data import cache, masks
from lora_offset.training.data.augment import color_aug, crop_box, resample
from lora_offset.training.data.buckets import SIZE_MULTIPLE, Size, bucket_resolutions, image_bucket, resolution_size
from lora_offset.training.data.captions import count_tags, fixed_caption, is_fixed, process_caption
from lora_offset.training.data.images import TOO_SMALL, load_image, one_line, to_tensor, upscale_factor
from lora_offset.training.data.scan import ImageEntry, ScanReport, pair_masks, scan_subset, warn_report

log = logging.getLogger("lora_offset.data")


def validate_dataset_config(cfg, where: str = "dataset") -> None:
    """Raise UserError for dataset settings that cannot work. `cfg` is a DatasetConfig; `where` its key."""
    for key in ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if key != "resolution" and not cfg.enable_bucket:
            continue
        value = getattr(cfg, key)
        for side in (value if isinstance(value, list) else [value]):
            if side < SIZE_MULTIPLE or side % SIZE_MULTIPLE:
                nearest = max(SIZE_MULTIPLE, round(side / SIZE_MULTIPLE) * SIZE_MULTIPLE)
                raise UserError(f"{where}.{key} = {value} is not a multiple of 64; Stable Diffusion 1.x needs image "
                                "sizes divisible by 64 (the VAE divides by 8, the UNet halves that 3 times): "
                                f"use {nearest}")
    if cfg.batch_size < 1:
        raise UserError(f"{where}.batch_size = {cfg.batch_size} must be at least 1")
    if cfg.enable_bucket:
        if cfg.min_bucket_reso > cfg.max_bucket_reso:
            raise UserError(f"dataset.min_bucket_reso = {cfg.min_bucket_reso} is larger than dataset.max_bucket_reso = "
                            f"{cfg.max_bucket_reso}; set min_bucket_reso <= max_bucket_reso")
        if cfg.bucket_reso_steps > min(resolution_size(cfg.resolution)):
            raise UserError(f"dataset.bucket_reso_steps = {cfg.bucket_reso_steps} is larger than dataset.resolution = "
                            f"{cfg.resolution}; use bucket_reso_steps = 64")
        if not cfg.min_bucket_reso <= min(resolution_size(cfg.resolution)) <= max(resolution_size(cfg.resolution)) \
                <= cfg.max_bucket_reso:
            raise UserError(f"dataset.resolution = {cfg.resolution} must lie between dataset.min_bucket_reso = "
                            f"{cfg.min_bucket_reso} and dataset.max_bucket_reso = {cfg.max_bucket_reso}")
    for i, s in enumerate(cfg.subsets):
        if s.num_repeats < 1:
            raise UserError(f"dataset.subsets[{i}].num_repeats = {s.num_repeats} must be at least 1")
        if s.keep_tokens < 0:
            raise UserError(f"dataset.subsets[{i}].keep_tokens = {s.keep_tokens} must be 0 or more")

@dataclass
class Batch:
    """One training step's images. Instance samples first, then class samples (is_reg True)."""

    captions: list[str]
    is_reg: torch.Tensor  # bool (N,)
    paths: list[Path]
    pixel_values: torch.Tensor | None = None  # float32 (N, 3, H, W) in [-1, 1], when latents are not cached
    latents: torch.Tensor | None = None  # float32 (N, 4, H/8, W/8), after cache_latents
    masks: torch.Tensor | None = None  # float32 (N, 1, H/8, W/8) loss weights in [0, 1], when a subset has masks

    def __len__(self) -> int:
        return len(self.captions)


def _generator(seed: int, *parts) -> torch.Generator:
    """A torch generator seeded by a hash of (seed, *parts): independent streams per purpose and step."""
    digest = hashlib.sha256(repr((int(seed),) + parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class DreamBoothDataset:
    """Scanned images and the deterministic batch schedule. Build it with `build_dataset`."""

    def __init__(self, cfg, seed: int, subsets: Sequence, entries: list[ImageEntry],
                 skipped: list[tuple[Path, str]], held_out: int = 0):
        self.cfg = cfg
        self.held_out = held_out  # instance images set aside for validation (validation_split)
        self.seed = int(seed)
        self.batch_size = cfg.batch_size
        self.subsets = list(subsets)
        self.entries = entries
        self.skipped = skipped
        instance = [i for i, e in enumerate(entries) if not e.is_reg]
        reg = [i for i, e in enumerate(entries) if e.is_reg]
        self.num_instance_images = len(instance)
        self.num_reg_images = len(reg)
        # kohya repeats: an image of a subset with num_repeats = 10 appears 10 times per epoch.
        self._instance_pool = [i for i in instance for _ in range(self.subsets[entries[i].subset].num_repeats)]
        self._reg_pool = [i for i in reg for _ in range(self.subsets[entries[i].subset].num_repeats)]
        self.num_train_items = len(self._instance_pool)  # kohya's ss_num_train_images (repeats included)
        by_bucket: dict[Size, list[int]] = {}
        for i in self._instance_pool:
            by_bucket.setdefault(entries[i].bucket, []).append(i)
        self._by_bucket = dict(sorted(by_bucket.items()))
        self.steps_per_epoch = sum(math.ceil(len(v) / self.batch_size) for v in self._by_bucket.values())
        self.tag_frequency: dict[str, dict[str, int]] = {}
        self.dataset_dirs: dict[str, dict[str, int]] = {}
        for index, subset in enumerate(self.subsets):
            name = Path(subset.image_dir).name
            captions = [e.caption for e in entries if e.subset == index]
            merged = self.tag_frequency.setdefault(name, {})
            for tag, n in count_tags(captions).items():
                merged[tag] = merged.get(tag, 0) + n
            self.dataset_dirs[name] = {"n_repeats": subset.num_repeats, "img_count": len(captions)}
        self._epoch_cache: tuple[int, list[list[int]], list[int]] | None = None
        self._reg_cycles: dict[int, list[int]] = {}
        self._latents: dict[tuple[int, Size, bool], torch.Tensor] | None = None
        self._masks: dict[tuple[int, Size], torch.Tensor] = {}  # cached with the latents
        self.has_masks = any(self.subsets[e.subset].alpha_mask or e.mask is not None for e in entries)

    # ---- facts -----------------------------------------------------------------------------
    @property
    def bucket_counts(self) -> dict[Size, int]:
        """Instance items (repeats included) per bucket (w, h)."""
        return {b: len(v) for b, v in self._by_bucket.items()}

    @property
    def captions(self) -> list[str]:
        """The distinct captions with prefix and suffix, each line of a wildcard caption on its own, before
        any random change (for check_caption_lengths)."""
        texts = set()
        for e in self.entries:
            subset = self.subsets[e.subset]
            text = fixed_caption(e.caption, subset) if is_fixed(subset) else e.caption
            texts.update(text.split("\n"))
        return sorted(texts)

    def caption_set(self) -> list[str] | None:
        """Every caption a batch can carry (for a text-embedding cache): each image's fixed caption, and the
        empty caption when a subset drops captions. None when a subset's captions change from use to use
        (shuffle, wildcards, tag dropout, token warm-up): those are encoded as they come."""
        used = [self.subsets[i] for i in sorted({e.subset for e in self.entries})]
        if not all(is_fixed(s) for s in used):
            return None
        texts = {fixed_caption(e.caption, self.subsets[e.subset]) for e in self.entries}
        if any(s.caption_dropout_rate > 0 or s.caption_dropout_every_n_epochs > 0 for s in used):
            texts.add("")
        return sorted(texts)

    @property
    def latents_cached(self) -> bool:
        return self._latents is not None

    # ---- the schedule: pure functions of (seed, step) ----------------------------------------
    def _epoch_plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """(batches of entry indices, instance items before each batch) for one epoch."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1], self._epoch_cache[2]
        g = _generator(self.seed, "epoch", epoch)
        batches: list[list[int]] = []
        for items in self._by_bucket.values():
            order = torch.randperm(len(items), generator=g).tolist()
            shuffled = [items[k] for k in order]
            batches.extend(shuffled[k:k + self.batch_size] for k in range(0, len(shuffled), self.batch_size))
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        before, total = [], 0
        for b in batches:
            before.append(total)
            total += len(b)
        self._epoch_cache = (epoch, batches, before)
        return batches, before

    def _reg_item(self, position: int) -> int:
        """The class image at a global position of the class stream: reg pool reshuffled each cycle."""
        cycle, offset = divmod(position, len(self._reg_pool))
        if cycle not in self._reg_cycles:
            if len(self._reg_cycles) > 4:
                self._reg_cycles.clear()
            order = torch.randperm(len(self._reg_pool), generator=_generator(self.seed, "reg", cycle)).tolist()
            self._reg_cycles[cycle] = [self._reg_pool[k] for k in order]
        return self._reg_cycles[cycle][offset]

    def batch_plan(self, step: int) -> tuple[list[int], list[int], Size]:
        """(instance entry indices, class entry indices, (w, h)) of a step; no image is read."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.plan_at(*divmod(step, self.steps_per_epoch))

    def plan_at(self, epoch: int, index: int) -> tuple[list[int], list[int], Size]:
        """batch_plan of the `index`-th batch of epoch `epoch` (counted from 0)."""
        batches, before = self._epoch_plan(epoch)
        instance = batches[index]
        size = self.entries[instance[0]].bucket
        reg: list[int] = []
        if self._reg_pool:
            # Class images form one endless stream, consumed as many per batch as it has instance images,
            # so every class image is used about equally often.
            start = epoch * len(self._instance_pool) + before[index]
            reg = [self._reg_item(start + k) for k in range(len(instance))]
        return instance, reg, size

    def batch(self, step: int, *, optimizer_step: int | None = None, max_steps: int | None = None) -> Batch:
        """The batch number `step` (a micro-batch of the global batch): same (seed, step), same batch, in any
        process. `optimizer_step` (default: `step`) drives caption token warm-up; `max_steps` turns a
        fractional token_warmup_step into steps."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return self.batch_at(epoch, index, step, optimizer_step=optimizer_step, max_steps=max_steps)

    def batch_at(self, epoch: int, index: int, step: int, *, optimizer_step: int | None = None,
                 max_steps: int | None = None) -> Batch:
        """The `index`-th batch of epoch `epoch`, with the random choices of batch number `step` (see batch)."""
        instance, reg, size = self.plan_at(epoch, index)
        optimizer_step = step if optimizer_step is None else optimizer_step
        g = _generator(self.seed, "augment", step)
        captions, flips = [], []
        for i in instance + reg:
            entry = self.entries[i]
            subset = self.subsets[entry.subset]
            flip = bool(torch.rand((), generator=g) < 0.5)  # drawn always, so one subset's setting moves no other's
            flips.append(flip and subset.flip_aug)
            # epoch counted from 1, as kohya's caption_dropout_every_n_epochs
            captions.append(process_caption(entry.caption, subset, g, epoch=epoch + 1, step=optimizer_step,
                                            max_steps=max_steps))
        indices = instance + reg
        batch = Batch(captions=captions,
                      is_reg=torch.tensor([False] * len(instance) + [True] * len(reg), dtype=torch.bool),
                      paths=[self.entries[i].path for i in indices])
        sample_masks = []
        if self._latents is not None:
            batch.latents = torch.stack([self._latents[(i, size, f)] for i, f in zip(indices, flips)])
            for i, flip in zip(indices, flips):
                mask = self._masks.get((i, size))
                sample_masks.append(None if mask is None else mask.flip(-1) if flip else mask)
        else:
            pixels = []
            for position, (i, flip) in enumerate(zip(indices, flips)):
                subset = self.subsets[self.entries[i].subset]
                # Own streams per sample, drawn only when asked for: turning them on moves no other choice.
                crop = _generator(self.seed, "crop", step, position) if subset.random_crop else None
                color = _generator(self.seed, "color", step, position) if subset.color_aug else None
                px, mask = self.render(i, [size], flip=flip, crop=crop, color=color)[size]
                pixels.append(px)
                sample_masks.append(mask)
            batch.pixel_values = torch.stack(pixels)
        if self.has_masks:
            latent_size = (1, size[1] // masks.LATENT_FACTOR, size[0] // masks.LATENT_FACTOR)
            batch.masks = torch.stack([torch.ones(latent_size) if m is None else m for m in sample_masks])
        return batch

    def render(self, index: int, sizes: Sequence[Size], *, flip: bool = False, crop: torch.Generator | None = None,
               color: torch.Generator | None = None) -> dict[Size, tuple[torch.Tensor, torch.Tensor | None]]:
        """Entry `index` as a sample at each of `sizes`: {size: (pixels float32 (3, H, W) in [-1, 1], mask
        float32 (1, H/8, W/8) or None)}; cut at random with a `crop` generator (else centred), colour-jittered
        with a `color` generator, flipped with `flip`. The mask follows every geometric step of the pixels."""
        entry = self.entries[index]
        subset = self.subsets[entry.subset]
        # A mask file has the image's full size: decode the image at full size too (no JPEG draft).
        img, alpha = _read(lambda: load_image(entry.path, () if entry.mask is not None else sizes, with_alpha=True),
                           "image", entry.path)
        mask_img = _read(lambda: masks.read_mask(entry.mask), "mask", entry.mask) if entry.mask is not None else None
        if subset.alpha_mask:
            mask_img = alpha if alpha is not None else Image.new("L", img.size, 255)
        out = {}
        for size in sizes:
            box = crop_box(img.size, size, crop)
            placed = resample(img, size, box, subset.resize_interpolation)
            px = to_tensor(color_aug(placed, color) if color is not None else placed)
            mask = None
            if mask_img is not None:
                mask = masks.to_latent_size(masks.to_mask_tensor(resample(mask_img, size, box,
                                                                          subset.resize_interpolation)))
            if flip:
                px, mask = px.flip(-1), None if mask is None else mask.flip(-1)
            out[size] = (px, mask)
        return out

    # ---- latent cache --------------------------------------------------------------------------
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], cache_dir: Path | str | None = None,
                      *, encoder_id: str = "", batch_size: int = 4) -> None:
        """Encode every (image, size, flip) a batch can use, once (see cache.encode_latents);
        afterwards `batch()` returns latents (and the masks cached with them)."""
        changing = [f"{key}" for s in self.subsets for key in ("random_crop", "color_aug") if getattr(s, key)]
        if changing:  # config_rules refuses the pair earlier; this guards direct use of the dataset
            raise UserError(f"{changing[0]} = true changes the image at every use, so its latents cannot be cached: "
                            "set training.cache_latents = false")
        self._latents, self._masks = cache.encode_latents(self, encode, cache_dir, encoder_id=encoder_id,
                                                          batch_size=batch_size)


def _read(load: Callable, what: str, path: Path):
    try:
        return load()
    except Exception as e:
        raise UserError(f"cannot read {what} '{path}' ({one_line(e)}); it was readable when the dataset was "
                        "scanned: restore it or remove it and start again") from None


def build_dataset(cfg, seed: int, *, where: str = "dataset", part: str = "train") -> DreamBoothDataset | None:
    """Scan every subset of DatasetConfig `cfg` and return the dataset. Cheap: no full decode of PNGs.

    `where`: the dataset's key in messages. `part`: "train", or "validation" for the images that
    `validation_split` holds out (kohya: each instance subset's images shuffled by `validation_seed`,
    default `seed`; the first ceil(n x (1 - split)) train, the rest validate, each once per epoch; class
    images are never held out); None when nothing is held out.
    Raises UserError for a missing folder, a subset with captionless images and no class_tokens,
    a regularization subset without readable images, or no readable instance image at all.
    Logs one warning per kind of problem (skipped images, ignored files, Latin-1 and empty captions).
    """
    validate_dataset_config(cfg, where)
    subsets = list(cfg.subsets)
    if not any(not s.is_reg for s in subsets):
        raise UserError(f"the dataset has no instance images configured: set {where}.train_data_dir or add "
                        f"[[{where}.subsets]] with image_dir")
    if part == "validation":
        subsets = [dataclasses.replace(s, num_repeats=1) for s in subsets]
    buckets = None
    if cfg.enable_bucket and not cfg.bucket_no_upscale:
        buckets = bucket_resolutions(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    validation_seed = seed if cfg.validation_seed is None else cfg.validation_seed
    report = ScanReport()
    entries: list[ImageEntry] = []
    empty_reg: list[int] = []
    held_out = 0
    for index, subset in enumerate(subsets):
        found = scan_subset(subset, f"{where}.subsets[{index}]", report)
        if subset.is_reg and not found and subset.num_class_images == 0:
            empty_reg.append(index)  # with num_class_images, the trainer fills it before training
        mask_files = pair_masks(subset, f"{where}.subsets[{index}]", found) if subset.conditioning_data_dir \
            else [None] * len(found)
        items = list(zip(found, mask_files))
        if cfg.validation_split > 0 and not subset.is_reg:
            train, validation = split_for_validation(items, cfg.validation_split, validation_seed)
            held_out += len(validation)
            items = train if part == "train" else validation
        elif part == "validation":
            items = []
        for (path, size, caption), mask in items:
            entry = ImageEntry(path=path, caption=caption, subset=index, is_reg=bool(subset.is_reg),
                               size=size, bucket=image_bucket(size, cfg, buckets), mask=mask)
            if not entry.is_reg and upscale_factor(size, entry.bucket) > 1:
                report.upscaled.append((path, size, entry.bucket))
            entries.append(entry)
    if part == "validation":
        return DreamBoothDataset(cfg, seed, subsets, entries, []) if entries else None
    warn_report(report)
    if not any(not e.is_reg for e in entries):
        folders = ", ".join(f"'{s.image_dir}'" for s in subsets if not s.is_reg)
        note = ""
        if report.skipped:
            small = sum(1 for _, reason in report.skipped if reason.startswith(TOO_SMALL))
            kinds = [f"{n} {what}" for n, what in ((len(report.skipped) - small, "unreadable"), (small, "too small")) if n]
            note = f" ({len(report.skipped)} file(s) were skipped: {', '.join(kinds)}; listed in the warnings above)"
        raise UserError(f"no readable instance images in {folders}; put .jpg, .jpeg, .png, .webp, .bmp or .gif images "
                        f"there{note}")
    if empty_reg:
        index = empty_reg[0]
        raise UserError(f"{where}.subsets[{index}] (is_reg = true) has no readable class images in "
                        f"'{subsets[index].image_dir}'; add class images, set num_class_images to have them "
                        "generated, or remove the subset")
    return DreamBoothDataset(cfg, seed, subsets, entries, list(report.skipped), held_out=held_out)


def split_for_validation(items: list, share: float, seed: int) -> tuple[list, list]:
    """kohya's split_train_val: the items shuffled by Python's `random` seeded with `seed`; the first
    ceil(n x (1 - share)) train, the others validate (kohya's own validation part may overlap the
    training part by one image; here it is the rest). Both parts keep the items' order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    train = set(order[:math.ceil(len(items) * (1 - share))])
    return [x for k, x in enumerate(items) if k in train], [x for k, x in enumerate(items) if k not in train]
