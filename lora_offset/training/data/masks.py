"""Loss masks (kohya's `alpha_mask` and `masked_loss`): where they come from and how they reach latent size.

A mask says how much each pixel counts in the loss: 1 = learn it, 0 = ignore it. Two sources, per subset:

* `alpha_mask = true`: the image's own alpha channel (255 = 1). An image without transparency gets
  an all-ones mask. The pixels are still composited on white, as for any transparent image.
* `conditioning_data_dir` (with `training.masked_loss = true`), kohya's layout: a folder holding,
  for each training image, an image of the same stem (any image extension) and the same size whose
  red channel is the mask (a grey image works as is). A missing mask is an error; so is one of
  another size than its image.

The mask is cut, resized and flipped exactly as its image (augment.py: same box, same resampling,
same flip), then averaged over each 8x8 block to the latent grid (kohya: `interpolate(mode="area")`),
so each latent cell carries the share of its pixels that count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lora_offset.training.data.images import IMAGE_EXTENSIONS

LATENT_FACTOR = 8
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def alpha_channel(img: Image.Image) -> Image.Image | None:
    """The alpha channel of a decoded image as an 8-bit "L" image, or None if it has no transparency."""
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        return img.convert("RGBA").getchannel("A")
    return None


def mask_channel(img: Image.Image) -> Image.Image:
    """The mask in a conditioning image (kohya: its red channel), as an 8-bit "L" image."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        from lora_offset.training.data.images import to_rgb

        return to_rgb(img).getchannel("R")
    return img.convert("RGB").getchannel("R")  # alpha, if any, is dropped (not composited)


def read_mask(path: Path) -> Image.Image:
    """A conditioning image decoded upright, its mask channel as an 8-bit "L" image."""
    from PIL import ImageOps

    with Image.open(path) as img:
        img.load()
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception:  # unreadable EXIF: keep the pixels as stored (as the image does)
            upright = img.copy()
    return mask_channel(upright)


def find_conditioning_image(folder: Path, stem: str) -> Path | None:
    """The image in `folder` named `stem` with an image extension (any case), kohya's pairing rule."""
    matches = sorted(p for p in folder.glob(f"{glob_escape(stem)}.*")
                     if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem == stem)
    return matches[0] if matches else None


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def to_mask_tensor(img: Image.Image) -> torch.Tensor:
    """An 8-bit "L" image -> float32 (H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0)


def to_latent_size(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) pixel mask -> (1, H/8, W/8): the mean of each 8x8 block."""
    h, w = mask.shape
    if h % LATENT_FACTOR or w % LATENT_FACTOR:
        raise ValueError(f"mask size {w}x{h} is not a multiple of {LATENT_FACTOR}")
    return F.avg_pool2d(mask[None, None].float(), LATENT_FACTOR)[0]
