"""Several datasets in one run (batches never mix datasets, kohya's epoch) and kohya's validation split."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_offset.config import DatasetConfig, SubsetConfig
from lora_offset.training.data.dataset import build_dataset, split_for_validation
from lora_offset.training.data.group import build_datasets
from lora_offset.training.validation import validation_timesteps


def images(folder: Path, n: int, size=(64, 64), prefix="img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)) + n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(folder / f"{prefix}{i}.png")
    return folder


def sub(folder: Path, **kw) -> SubsetConfig:
    kw.setdefault("class_tokens", "sks")
    return SubsetConfig(image_dir=str(folder), **kw)


def test_batches_never_mix_datasets_and_an_epoch_is_every_batch_of_every_dataset(tmp_path):
    small = DatasetConfig(resolution=64, batch_size=2, subsets=[
        sub(images(tmp_path / "a", 3), num_repeats=2),
        sub(images(tmp_path / "reg", 2), is_reg=True, class_tokens="dog")])
    large = DatasetConfig(resolution=128, batch_size=3, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256,
                          subsets=[sub(images(tmp_path / "b", 4, size=(300, 100)))])
    group = build_datasets([small, large], seed=5)
    first, second = group.datasets
    assert (first.steps_per_epoch, second.steps_per_epoch) == (3, 2)  # ceil(6 / 2), ceil(4 / 3)
    assert group.steps_per_epoch == 5 and group.num_train_items == 10 and group.num_reg_images == 2
    for epoch in range(3):
        seen: dict[str, int] = {}
        order = []
        for step in range(epoch * 5, epoch * 5 + 5):
            b = group.batch(step)
            folders = {p.parent.name for p in b.paths}
            n = int((~b.is_reg).sum())
            if folders <= {"a", "reg"}:
                order.append(0)
                assert b.pixel_values.shape[2:] == (64, 64)
                assert {p.parent.name for p in b.paths[:n]} == {"a"} and {p.parent.name for p in b.paths[n:]} == {"reg"}
            else:
                order.append(1)
                assert folders == {"b"} and b.pixel_values.shape[2:] == (64, 192)  # its own bucket
                assert not b.is_reg.any()
            for p in b.paths[:n]:
                seen[p.name + p.parent.name] = seen.get(p.name + p.parent.name, 0) + 1
        assert sorted(order) == [0, 0, 0, 1, 1]
        assert seen == {**{f"img{i}.pnga": 2 for i in range(3)}, **{f"img{i}.pngb": 1 for i in range(4)}}
    orders = [[group.dataset_of(e * 5 + k) for k in range(5)] for e in range(6)]
    assert len({tuple(o) for o in orders}) > 1  # the datasets' batches interleave differently each epoch
    again = build_datasets([small, large], seed=5)
    assert all(again.batch(s).paths == group.batch(s).paths for s in range(10))
    # metadata: one entry per dataset
    meta = json.loads(group.ss_datasets())
    assert [(m["resolution"], m["batch_size_per_device"], m["num_train_images"], m["enable_bucket"]) for m in meta] \
        == [([64, 64], 2, 6, False), ([128, 128], 3, 4, True)]
    assert [s["image_dir"] for s in meta[0]["subsets"]] == ["a", "reg"] and meta[0]["subsets"][1]["is_reg"]
    assert meta[1]["bucket_info"]["buckets"]["0"] == {"resolution": [192, 64], "count": 4}


def test_a_group_of_one_is_that_dataset_batch_for_batch(tmp_path):
    c = DatasetConfig(resolution=64, batch_size=2, subsets=[sub(images(tmp_path / "a", 5), flip_aug=True,
                                                                shuffle_caption=True)])
    group, single = build_datasets([c], seed=3), build_dataset(c, seed=3)
    for step in range(9):
        x, y = group.batch(step), single.batch(step)
        assert x.paths == y.paths and x.captions == y.captions and torch.equal(x.pixel_values, y.pixel_values)


def test_resolution_width_height_sets_the_size_and_the_buckets_area(tmp_path):
    c = DatasetConfig(resolution=[128, 64], subsets=[sub(images(tmp_path / "a", 1, size=(300, 100)))])
    assert build_dataset(c, seed=0).batch(0).pixel_values.shape[2:] == (64, 128)
    bucketed = DatasetConfig(resolution=[128, 64], enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256,
                             subsets=c.subsets)
    assert build_dataset(bucketed, seed=0).entries[0].bucket == (128, 64)  # area <= 128 x 64, aspect 3 -> 2


def test_validation_split_is_kohyas(tmp_path):
    names = [f"img{i}.png" for i in range(10)]
    items = list(range(10))
    train, held = split_for_validation(items, 0.25, seed=11)
    order = list(range(10))
    random.Random(11).shuffle(order)  # kohya: random.seed(validation_seed); random.shuffle(...)
    assert set(train) == set(order[:math.ceil(10 * 0.75)]) and len(train) == 8
    assert sorted(train + held) == items and not set(train) & set(held)
    images(tmp_path / "a", 10)
    images(tmp_path / "reg", 3, prefix="r")
    c = DatasetConfig(resolution=64, batch_size=2, validation_split=0.25, validation_seed=11, subsets=[
        sub(tmp_path / "a", num_repeats=3), sub(tmp_path / "reg", is_reg=True, class_tokens="dog")])
    training = build_dataset(c, seed=0)
    validation = build_dataset(c, seed=0, part="validation")
    assert sorted(e.path.name for e in training.entries if not e.is_reg) == sorted(names[i] for i in train)
    assert sorted(e.path.name for e in validation.entries) == sorted(names[i] for i in held)
    assert training.held_out == 2 and training.num_reg_images == 3  # class images are never held out
    assert validation.num_train_items == 2 and validation.num_reg_images == 0  # once each, no repeats
    assert build_dataset(DatasetConfig(resolution=64, subsets=c.subsets), seed=0, part="validation") is None
    other = build_dataset(DatasetConfig(resolution=64, validation_split=0.25, validation_seed=12,
                                        subsets=c.subsets), seed=0, part="validation")
    assert {e.path.name for e in other.entries} != {e.path.name for e in validation.entries}


def test_validation_timesteps_are_kohyas():
    assert validation_timesteps(0, 1000) == [200, 400, 600, 800]
    assert validation_timesteps(100, 900) == [260, 420, 580, 740]
    assert validation_timesteps(0, 999) == [199, 399, 599, 799]  # numpy's linspace(..., dtype=int) floors
