"""Aspect-ratio buckets: pure functions of image sizes (kohya's bucket list and choice)."""

from __future__ import annotations

import math
from typing import Sequence

SIZE_MULTIPLE = 64  # SD 1.x: VAE factor 8 x three UNet downsamplings

Size = tuple[int, int]  # (width, height), PIL's order


def resolution_size(resolution: int | Sequence[int]) -> Size:
    """A dataset's `resolution` (one side, or kohya's [width, height]) as (width, height)."""
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def bucket_resolutions(resolution: int | Sequence[int], min_reso: int, max_reso: int, step: int) -> list[Size]:
    """kohya's bucket list: (w, h) with area <= the resolution's area (resolution² or width x height), sides
    in [min_reso, max_reso] in `step`s.

    The square bucket is always present; every other bucket comes with its transpose.
    """
    max_area = math.prod(resolution_size(resolution))
    square = int(math.sqrt(max_area) // step) * step
    buckets = {(square, square)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int(max_area // width // step) * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio w/h is nearest the image's (ties: the first in list order)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def no_upscale_bucket(size: Size, resolution: int | Sequence[int], step: int) -> Size:
    """bucket_no_upscale: the image's own size, shrunk to the resolution's area if larger, floored to `step`.

    A side that floors to 0 gets one `step` (a slight upscale; images under 64 px are skipped anyway).
    """
    w, h = size
    max_area = math.prod(resolution_size(resolution))
    if w * h > max_area:
        scale = math.sqrt(max_area / (w * h))
        w, h = w * scale, h * scale
    return max(step, int(w // step) * step), max(step, int(h // step) * step)


def image_bucket(size: Size, cfg, buckets: Sequence[Size] | None = None) -> Size:
    """The training size of an image of `size` under DatasetConfig `cfg`."""
    if not cfg.enable_bucket:
        return resolution_size(cfg.resolution)
    if cfg.bucket_no_upscale:
        return no_upscale_bucket(size, cfg.resolution, cfg.bucket_reso_steps)
    if buckets is None:
        buckets = bucket_resolutions(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    return nearest_bucket(size, buckets)


def center_crop_box(size: Size, target: Size) -> tuple[float, float, float, float]:
    """Source box (left, top, right, bottom) of the largest centred region with the target's aspect.

    Resizing that box to `target` is "resize to cover, then centre crop" in one resampling.
    """
    w, h = size
    tw, th = target
    if w * th > h * tw:  # image wider than target: full height, crop the sides
        box_w, box_h = h * tw / th, h
    else:
        box_w, box_h = w, w * th / tw
    left, top = (w - box_w) / 2, (h - box_h) / 2
    return left, top, left + box_w, top + box_h
