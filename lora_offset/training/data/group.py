"""Several datasets in one run (kohya's DatasetGroup): each its own resolution, batch size and buckets.

An epoch is every batch of every dataset once (kohya: the length of the group is the sum of its
datasets' batch counts), in an order shuffled per epoch from the seed; a batch is always one
dataset's batch, so batches never mix datasets (nor resolutions). Each dataset keeps its own
schedule (its epoch's batches, its class-image stream) under its own seed, `seed + i`; with one
dataset the group is that dataset, batch for batch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from lora_offset.training.data.buckets import resolution_size
from lora_offset.training.data.dataset import Batch, DreamBoothDataset, _generator, build_dataset


class DatasetGroup:
    def __init__(self, datasets: Sequence[DreamBoothDataset], seed: int):
        self.datasets = list(datasets)
        self.seed = int(seed)
        self.steps_per_epoch = sum(d.steps_per_epoch for d in self.datasets)
        self.num_train_items = sum(d.num_train_items for d in self.datasets)  # kohya's ss_num_train_images
        self.num_reg_images = sum(d.num_reg_images for d in self.datasets)
        self.held_out = sum(d.held_out for d in self.datasets)
        self.has_masks = any(d.has_masks for d in self.datasets)
        # kohya merges the folders' tag counts; a folder used by several datasets counts once.
        self.tag_frequency: dict[str, dict[str, int]] = {}
        for d in self.datasets:
            for folder, counts in d.tag_frequency.items():
                self.tag_frequency.setdefault(folder, counts)
        self._plan_cache: tuple[int, list[tuple[int, int]]] | None = None

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def captions(self) -> list[str]:
        return sorted({c for d in self.datasets for c in d.captions})

    def caption_set(self) -> list[str] | None:
        """Every caption a batch can carry (text-embedding cache), or None if one dataset's captions vary."""
        sets = [d.caption_set() for d in self.datasets]
        return None if any(s is None for s in sets) else sorted({c for s in sets for c in s})

    @property
    def latents_cached(self) -> bool:
        return all(d.latents_cached for d in self.datasets)

    # ---- the schedule ------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> list[tuple[int, int]]:
        """(dataset, batch of that dataset's epoch) for each step of epoch `epoch`."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        plan = [(d, k) for d, ds in enumerate(self.datasets) for k in range(ds.steps_per_epoch)]
        if len(self.datasets) > 1:
            order = torch.randperm(len(plan), generator=_generator(self.seed, "group", epoch)).tolist()
            plan = [plan[k] for k in order]
        self._plan_cache = (epoch, plan)
        return plan

    def dataset_of(self, step: int) -> int:
        epoch, index = divmod(step, self.steps_per_epoch)
        return self.epoch_plan(epoch)[index][0]

    def batch(self, step: int, *, optimizer_step: int | None = None, max_steps: int | None = None) -> Batch:
        """The batch number `step`: one dataset's batch (see DreamBoothDataset.batch)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        d, k = self.epoch_plan(epoch)[index]
        return self.datasets[d].batch_at(epoch, k, step, optimizer_step=optimizer_step, max_steps=max_steps)

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], cache_dir: Path | str | None = None,
                      *, encoder_id: str = "", batch_size: int = 4) -> None:
        for d in self.datasets:
            d.cache_latents(encode, cache_dir, encoder_id=encoder_id, batch_size=batch_size)

    # ---- metadata ----------------------------------------------------------------------------------
    def ss_datasets(self) -> str:
        """kohya's `ss_datasets` (JSON): one entry per dataset, with its subsets."""
        out = []
        for d in self.datasets:
            cfg = d.cfg
            subsets = []
            for index, s in enumerate(d.subsets):
                subsets.append({
                    "img_count": sum(1 for e in d.entries if e.subset == index), "num_repeats": s.num_repeats,
                    "color_aug": s.color_aug, "flip_aug": s.flip_aug, "random_crop": s.random_crop,
                    "shuffle_caption": s.shuffle_caption, "keep_tokens": s.keep_tokens,
                    "keep_tokens_separator": s.keep_tokens_separator, "secondary_separator": s.secondary_separator,
                    "enable_wildcard": s.enable_wildcard, "caption_prefix": s.caption_prefix,
                    "caption_suffix": s.caption_suffix, "resize_interpolation": s.resize_interpolation,
                    "image_dir": Path(s.image_dir).name, "class_tokens": s.class_tokens, "is_reg": s.is_reg,
                    "alpha_mask": s.alpha_mask, "conditioning_data_dir": s.conditioning_data_dir,
                })
            out.append({
                "is_dreambooth": True, "batch_size_per_device": d.batch_size, "num_train_images": d.num_train_items,
                "num_reg_images": d.num_reg_images, "resolution": list(resolution_size(cfg.resolution)),
                "enable_bucket": cfg.enable_bucket,
                "min_bucket_reso": cfg.min_bucket_reso if cfg.enable_bucket else None,
                "max_bucket_reso": cfg.max_bucket_reso if cfg.enable_bucket else None,
                "tag_frequency": d.tag_frequency,
                "bucket_info": {"buckets": {str(i): {"resolution": list(b), "count": n}
                                            for i, (b, n) in enumerate(d.bucket_counts.items())}},
                "validation_split": cfg.validation_split, "num_validation_images": d.held_out,
                "subsets": subsets,
            })
        return json.dumps(out)


def build_datasets(cfgs, seed: int, *, batch_scale: int = 1, part: str = "train") -> DatasetGroup | None:
    """The group of DatasetConfigs `cfgs` (see build_dataset); `batch_scale` multiplies each batch size (the
    global batch of several processes). For part "validation": the held-out images, None if there are none."""
    datasets = []
    for i, cfg in enumerate(cfgs):
        where = "dataset" if len(cfgs) == 1 else f"datasets[{i}]"
        cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * batch_scale)
        dataset = build_dataset(cfg, seed + i, where=where, part=part)
        if dataset is not None:
            datasets.append(dataset)
    if not datasets:
        return None
    return DatasetGroup(datasets, seed)

