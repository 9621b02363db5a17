"""Where an image lands in its bucket, and kohya's per-sample augmentations, as small pure functions.

An image becomes a training sample in one resampling: the source region `box` (the largest region
with the bucket's aspect ratio: centred, or at a random place with `random_crop`) is resized onto
the bucket with the subset's `resize_interpolation`, then flipped (`flip_aug`). A mask takes the
same box, resampling and flip, so it stays aligned with the pixels to the pixel.

* `random_crop` (kohya's `trim_and_resize_if_required`): the image is scaled to cover the bucket
  as for the centre crop, and the bucket-sized window is placed at a uniformly random whole-pixel
  offset along the side that overhangs, instead of in the middle. It changes every time the image
  is used, so latents cannot be cached with it (refused, as in kohya).
* `color_aug` (kohya's `AugHelper.color_aug`): with probability 0.33 the image gets either (half
  the time each) a hue shift drawn uniformly in ±8 of OpenCV's 180 hue steps (±16°), or a gamma
  drawn in [0.95, 1.05]. The gamma is applied to intensities in [0, 1], as the albumentations
  `RandomGamma((95, 105))` that kohya's code replaced; kohya's own line raises the 0..255 values to
  the power, which clips most of a bright image to white. Pixels only, never the mask.
* `resize_interpolation` (kohya's names): lanczos, nearest, bilinear (= linear), bicubic (= cubic),
  area and box (both Pillow's BOX filter: the mean over each output pixel's footprint, which is
  OpenCV's INTER_AREA when shrinking). Unset: Lanczos (kohya: area when shrinking, Lanczos when
  enlarging).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from lora_offset.training.data.buckets import Size, center_crop_box

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8  # in OpenCV's hue steps of 2 degrees (kohya's hue_shift_limit)
GAMMA_RANGE = (0.95, 1.05)


def crop_box(size: Size, bucket: Size, generator: torch.Generator | None = None) -> Box:
    """The source region that is resized onto `bucket`: centred, or (with a generator: random_crop) at a
    random whole-pixel offset of the image scaled to cover the bucket."""
    box = center_crop_box(size, bucket)
    if generator is None:
        return box
    scale = bucket[0] / (box[2] - box[0])  # source pixels -> bucket pixels
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    offsets = []
    for length, window in ((size[0], box_w), (size[1], box_h)):
        slack = math.floor(length * scale - window * scale + 1e-6)  # whole bucket pixels that overhang
        shift = int(torch.randint(0, slack + 1, (), generator=generator)) if slack > 0 else 0
        offsets.append(min(shift / scale, length - window))
    left, top = offsets
    return left, top, left + box_w, top + box_h


def resample(img: Image.Image, bucket: Size, box: Box, interpolation: str | None = None) -> Image.Image:
    """`box` of `img` resized to `bucket` in one resampling (Lanczos unless `interpolation` names another)."""
    if img.size == bucket and box == (0, 0, bucket[0], bucket[1]):
        return img
    if interpolation is None:
        downscale = (box[2] - box[0]) > bucket[0]
        return img.resize(bucket, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0 if downscale else None)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"resize_interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    return img.resize(bucket, INTERPOLATIONS[interpolation], box=box)


def color_aug(img: Image.Image, generator: torch.Generator) -> Image.Image:
    """kohya's colour augmentation of an 8-bit RGB image (see the module docstring)."""
    if float(torch.rand((), generator=generator)) > COLOR_AUG_PROBABILITY:
        return img
    if float(torch.rand((), generator=generator)) > 0.5:
        shift = (float(torch.rand((), generator=generator)) * 2 - 1) * HUE_SHIFT_LIMIT  # OpenCV hue steps (of 180)
        return shift_hue(img, shift / 180.0)
    low, high = GAMMA_RANGE
    gamma = low + (high - low) * float(torch.rand((), generator=generator))
    values = np.asarray(img, dtype=np.float64) / 255.0
    return Image.fromarray(np.clip(np.rint(values ** gamma * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def shift_hue(img: Image.Image, turns: float) -> Image.Image:
    """Rotate the hue of an 8-bit RGB image by `turns` of the colour circle (0.5 = 180 degrees)."""
    hsv = np.array(img.convert("HSV"), dtype=np.int32)
    hsv[..., 0] = (hsv[..., 0] + round(turns * 256)) % 256  # Pillow's hue has 256 steps
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")
