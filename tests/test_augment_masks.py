"""kohya's augmentations and loss masks: random_crop, color_aug, resize_interpolation, alpha_mask,
conditioning_data_dir masks; a mask follows its image through bucketing, crop and flip to the pixel."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lora_offset.config import DatasetConfig, SubsetConfig
from lora_offset.errors import UserError
from lora_offset.training.data import augment
from lora_offset.training.data.dataset import build_dataset


def cfg(*subsets: SubsetConfig, **kw) -> DatasetConfig:
    kw.setdefault("resolution", 64)
    return DatasetConfig(subsets=list(subsets), **kw)


def sub(folder: Path, **kw) -> SubsetConfig:
    kw.setdefault("class_tokens", "sks")
    return SubsetConfig(image_dir=str(folder), **kw)


def column_image(path: Path, width: int, height: int) -> np.ndarray:
    """Red = the column index, green = the row index: every pixel says where it came from."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = np.arange(width)[None, :]
    arr[..., 1] = np.arange(height)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def masked_image(path: Path, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Black RGBA image whose alpha is random 4x4-pixel blocks of 0/255: composited on white its red
    channel is 255 - alpha, so the pixels themselves show where the mask must be."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 2, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
    arr = np.zeros((h, w, 4), np.uint8)
    arr[..., 3] = blocks * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="RGBA").save(path)
    return arr


def mask_from_pixels(px: torch.Tensor) -> torch.Tensor:
    """The latent-size mask that the pixels of a masked_image imply: 1 - red, averaged over 8x8 blocks."""
    red = (px[0] + 1) / 2
    return F.avg_pool2d((1 - red)[None, None], 8)[0]


# ---- random crop --------------------------------------------------------------------------------

def test_random_crop_lies_inside_the_bucket_and_differs_across_epochs(tmp_path):
    arr = column_image(tmp_path / "imgs" / "wide.png", 160, 64)
    c = cfg(sub(tmp_path / "imgs", random_crop=True))
    ds = build_dataset(c, seed=3)
    assert ds.steps_per_epoch == 1  # one image: step = epoch
    offsets = []
    for epoch in range(8):
        px = ds.batch(epoch).pixel_values[0]
        assert px.shape == (3, 64, 64)  # the bucket
        u8 = torch.round((px + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
        left = int(u8[0, 0, 0])
        assert 0 <= left <= 160 - 64  # inside the image scaled to cover the bucket
        assert np.array_equal(u8, arr[:, left:left + 64])  # exactly that window, whole pixels
        offsets.append(left)
    assert len(set(offsets)) >= 4  # a new crop each epoch
    again = build_dataset(c, seed=3)
    assert [int(round((again.batch(e).pixel_values[0, 0, 0, 0].item() + 1) * 127.5)) for e in range(8)] == offsets
    centred = build_dataset(cfg(sub(tmp_path / "imgs")), seed=3)
    assert all(int(round((centred.batch(e).pixel_values[0, 0, 0, 0].item() + 1) * 127.5)) == 48 for e in range(3))


def test_crop_box_is_uniform_over_the_overhang():
    g = torch.Generator().manual_seed(0)
    lefts = [augment.crop_box((300, 100), (64, 64), g)[0] for _ in range(2000)]
    scale = 64 / 100
    shifts = [round(left * scale) for left in lefts]  # in bucket pixels
    assert min(shifts) == 0 and max(shifts) == 128  # 300 px scaled to 192: 128 px overhang
    assert all(left + 100 <= 300 for left in lefts)
    counts = np.bincount(shifts, minlength=129)
    assert counts.min() > 0 and abs(np.mean(shifts) - 64) < 4
    assert augment.crop_box((300, 100), (64, 64)) == (100.0, 0.0, 200.0, 100.0)  # no generator: centred


# ---- colour, interpolation --------------------------------------------------------------------

def test_color_aug_is_kohyas_hue_or_gamma_jitter_one_time_in_three():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(30, 220, (16, 16, 3)).astype(np.uint8))
    hsv = np.asarray(img.convert("HSV")).astype(int)
    kinds = {"same": 0, "hue": 0, "gamma": 0}
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        out = augment.color_aug(img, g)
        if np.array_equal(np.asarray(out), np.asarray(img)):
            kinds["same"] += 1
            continue
        out_hsv = np.asarray(out.convert("HSV")).astype(int)
        shift = (out_hsv[..., 0] - hsv[..., 0]) % 256
        shift = np.where(shift > 128, shift - 256, shift)
        if np.median(np.abs(shift)) > 0:  # hue rotated, by at most 8 of OpenCV's 180 steps (+ rounding)
            assert np.abs(np.median(shift)) <= 8 * 256 / 180 + 1
            kinds["hue"] += 1
        else:  # gamma in [0.95, 1.05] moves mid-greys by at most ~4 %
            ratio = np.asarray(out, float).mean() / np.asarray(img, float).mean()
            assert 0.9 < ratio < 1.1
            kinds["gamma"] += 1
    assert 0.62 < kinds["same"] / 600 < 0.72  # kohya: applied with probability 0.33
    assert kinds["hue"] > 60 and kinds["gamma"] > 60


def test_resize_interpolation_names_kohyas_filters(tmp_path):
    arr = np.zeros((128, 128, 3), np.uint8)
    arr[::2, ::2] = 255  # a pixel grid: every filter gives a different 64 px image
    (tmp_path / "imgs").mkdir()
    Image.fromarray(arr).save(tmp_path / "imgs" / "grid.png")
    means = {}
    for name in ("nearest", "area", "box", "bilinear", "bicubic", "lanczos", None):
        ds = build_dataset(cfg(sub(tmp_path / "imgs", resize_interpolation=name)), seed=0)
        means[name] = ((ds.batch(0).pixel_values + 1) / 2).mean().item()
    assert means["nearest"] in (0.0, 1.0)  # one source pixel per output pixel
    assert means["area"] == means["box"] == pytest.approx(64 / 255, abs=1e-6)  # each 2x2 block's mean (63.75)
    assert len({round(v, 6) for v in means.values()}) >= 4
    assert means[None] == means["lanczos"]  # the default


# ---- masks --------------------------------------------------------------------------------------

def test_alpha_mask_follows_bucketing_random_crop_and_flip_exactly_at_latent_size(tmp_path):
    masked_image(tmp_path / "imgs" / "a.png", (300, 120), seed=0)  # bucket 192x64 (aspect 3 is nearest 2.5)
    c = cfg(sub(tmp_path / "imgs", alpha_mask=True, flip_aug=True, random_crop=True), resolution=128,
            enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)
    ds = build_dataset(c, seed=0)
    masks, flipped_mismatch = [], 0
    for step in range(10):
        b = ds.batch(step)
        assert b.pixel_values.shape[2:] == (64, 192) and b.masks.shape == (1, 1, 8, 24)
        expected = mask_from_pixels(b.pixel_values[0])
        assert torch.allclose(b.masks[0], expected, atol=1.5 / 255)  # the same cut, resampling and flip
        flipped_mismatch += not torch.allclose(b.masks[0].flip(-1), expected, atol=1.5 / 255)
        masks.append(b.masks[0])
    assert flipped_mismatch == 10  # a mask that missed a flip would show
    assert len({tuple(m.flatten().tolist()) for m in masks}) >= 5  # crops and flips really varied
    assert 0.2 < torch.stack(masks).mean() < 0.8 and masks[0].min() >= 0 and masks[0].max() <= 1


def test_cached_latents_carry_their_masks_for_both_flips(tmp_path):
    masked_image(tmp_path / "imgs" / "a.png", (300, 120), seed=1)
    c = cfg(sub(tmp_path / "imgs", alpha_mask=True, flip_aug=True), resolution=128, enable_bucket=True,
            min_bucket_reso=64, max_bucket_reso=256)

    def encode(px):  # a "VAE" whose first channel is the 8x8 mean of red: the mask is readable from it
        return torch.cat([F.avg_pool2d(px, 8), torch.zeros_like(F.avg_pool2d(px, 8))[:, :1]], dim=1)

    ds = build_dataset(c, seed=0)
    ds.cache_latents(encode, cache_dir=tmp_path / "cache")
    (_, unflipped), = ds.render(0, [(192, 64)]).values()
    plain = build_dataset(c, seed=0)  # the same batches without the cache
    flips = []
    for step in range(12):
        b = ds.batch(step)
        assert b.pixel_values is None and b.masks.shape == (1, 1, 8, 24)
        expected = 1 - (b.latents[0, 0] + 1) / 2
        assert torch.allclose(b.masks[0, 0], expected, atol=1.5 / 255)
        assert torch.allclose(plain.batch(step).masks, b.masks, atol=1e-6)
        assert torch.equal(b.masks[0], unflipped) or torch.equal(b.masks[0], unflipped.flip(-1))
        flips.append(torch.equal(b.masks[0], unflipped.flip(-1)))
    assert 0 < sum(flips) < 12  # both cached flips were used
    again = build_dataset(c, seed=0)
    again.cache_latents(lambda px: pytest.fail("encoded again"), cache_dir=tmp_path / "cache")
    assert all(torch.equal(again.batch(s).masks, ds.batch(s).masks) for s in range(6))


def test_opaque_images_of_an_alpha_mask_subset_count_everywhere(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "imgs" / "plain.jpg")
    b = build_dataset(cfg(sub(tmp_path / "imgs", alpha_mask=True)), seed=0).batch(0)
    assert torch.equal(b.masks, torch.ones(1, 1, 8, 8))
    assert build_dataset(cfg(sub(tmp_path / "imgs")), seed=0).batch(0).masks is None  # no mask, no weights


def test_conditioning_data_dir_masks_use_the_red_channel_and_follow_the_image(tmp_path):
    arr = column_image(tmp_path / "imgs" / "a.png", 96, 64)
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 40:] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.stack([mask, np.zeros_like(mask), np.zeros_like(mask)], -1)).save(tmp_path / "masks" / "a.png")
    c = cfg(sub(tmp_path / "imgs", conditioning_data_dir=str(tmp_path / "masks"), random_crop=True, flip_aug=True))
    ds = build_dataset(c, seed=0)
    for step in range(8):
        b = ds.batch(step)
        columns = torch.round((b.pixel_values[0, 0] + 1) * 127.5)[0]  # source column of each output column
        expected = (columns >= 40).float()[None].expand(64, 64)
        assert torch.allclose(b.masks[0, 0], F.avg_pool2d(expected[None, None], 8)[0, 0], atol=1e-6)
    assert arr.shape == (64, 96, 3)


def test_conditioning_masks_missing_or_of_another_size_are_errors(tmp_path, caplog):
    column_image(tmp_path / "imgs" / "a.png", 64, 64)
    column_image(tmp_path / "imgs" / "b.png", 64, 64)
    (tmp_path / "masks").mkdir()
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "a.webp")
    c = cfg(sub(tmp_path / "imgs", conditioning_data_dir=str(tmp_path / "masks")))
    with pytest.raises(UserError, match=r"1 image\(s\) of '.*imgs' have no mask in "
                                        r"dataset.subsets\[0\].conditioning_data_dir = '.*masks' .*: b$"):
        build_dataset(c, seed=0)
    Image.new("L", (64, 32), 255).save(tmp_path / "masks" / "b.png")
    with pytest.raises(UserError, match=r"mask '.*b.png' is 64x32 px but its image '.*b.png' is 64x64 px"):
        build_dataset(c, seed=0)
    Image.new("L", (64, 64), 0).save(tmp_path / "masks" / "b.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "masks" / "c_typo.png")
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(c, seed=0)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "1 image(s) match no training image and are not used: c_typo.png"]
    masks = {p.name: m for step in range(2) for p, m in zip(ds.batch(step).paths, ds.batch(step).masks)}
    assert masks["a.png"].min() == 1 and masks["b.png"].max() == 0
    with pytest.raises(UserError, match="is not a folder"):
        build_dataset(cfg(sub(tmp_path / "imgs", conditioning_data_dir=str(tmp_path / "nope"))), seed=0)


def test_a_dataset_with_random_crop_or_color_aug_refuses_a_latent_cache(tmp_path):
    column_image(tmp_path / "imgs" / "a.png", 96, 64)
    for key in ("random_crop", "color_aug"):
        ds = build_dataset(cfg(sub(tmp_path / "imgs", **{key: True})), seed=0)
        with pytest.raises(UserError, match=f"{key} = true changes the image at every use"):
            ds.cache_latents(lambda px: pytest.fail("encoded"))
