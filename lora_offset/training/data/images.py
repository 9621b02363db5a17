"""Images: cheap probing, decoding to upright 8-bit RGB, fitting to a bucket, tensors."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from lora_offset.training.data.augment import resample
from lora_offset.training.data.buckets import Size, center_crop_box

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MIN_IMAGE_SIDE = 64  # smaller images are skipped, not blown up


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _oriented_size(img: Image.Image) -> Size:
    w, h = img.size
    if img.format == "PNG" and "exif" not in img.info:
        return w, h  # an eXIf chunk after the pixels (rare): reading it would decode the whole image
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block must not cost the image
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def probe_image(path: Path, min_side: int = MIN_IMAGE_SIDE) -> tuple[Size | None, str | None]:
    """Check that `path` is a readable image, cheaply. Returns (size after EXIF rotation, None) or (None, reason).

    PNGs are checked chunk by chunk (CRCs, no inflate); JPEGs are decoded at 1/8 scale, which
    reads every byte, so truncation shows; other formats (small, fast) are decoded fully.
    """
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        return None, f"cannot read ({e.strerror})"
    if nbytes == 0:
        return None, "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Corrupt EXIF data")  # orientation falls back to none
            with Image.open(path) as img:
                if img.format == "PNG":
                    img.verify()  # must come first and leaves the image unusable: reopen for the size
            with Image.open(path) as img:
                size = _oriented_size(img)
                if img.format != "PNG":
                    img.draft(None, (1, 1))
                    img.load()
    except UnidentifiedImageError:
        return None, "not an image (Pillow cannot identify the file's format)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, (f"too large: more pixels than Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,}; "
                      "downscale it")
    except MemoryError:
        return None, "too large to decode in memory"
    except Exception as e:  # truncated data, bad CRC, broken headers: each format raises its own type
        return None, f"truncated or corrupt ({one_line(e)})"
    if min(size) < min_side:
        return None, too_small_reason(size, min_side)
    return size, None


TOO_SMALL = "too small"


def too_small_reason(size: Size, min_side: int = MIN_IMAGE_SIDE) -> str:
    return (f"{TOO_SMALL}: {size[0]}x{size[1]} px; SD 1.x needs at least {min_side} px on each side: "
            "use a larger image")


def upscale_factor(size: Size, bucket: Size) -> float:
    """How much fitting an image of `size` to `bucket` (resize to cover, centre-crop) enlarges it; > 1 is an upscale."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB: transparency on white, 16-bit scaled, CMYK via its ICC profile."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's convert() clips these to 0..255, which turns a 16-bit photo white.
        values = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(img).astype(np.float64)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: Pillow's plain conversion is still a usable image
            pass
    return img if mode == "RGB" else img.convert("RGB")


def load_image(path: Path, targets: Iterable[Size] = (), with_alpha: bool = False):
    """Decode `path` to an upright 8-bit RGB image (first frame of an animation).

    `targets`: sizes the image will be resized to cover; JPEGs are then decoded at the smallest
    1/2, 1/4 or 1/8 scale that still covers them all, which is much faster for large photos.
    `with_alpha`: return (RGB image, its alpha channel as an "L" image or None without transparency);
    the RGB pixels are composited on white either way.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # probe_image has decided already
        warnings.filterwarnings("ignore", message="Corrupt EXIF data")
        with Image.open(path) as img:
            targets = list(targets)
            if targets and img.format == "JPEG":
                ow, oh = _oriented_size(img)
                scale = max(max(tw / ow, th / oh) for tw, th in targets)
                if scale < 1:
                    img.draft(None, (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
            img.load()
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # unreadable EXIF: keep the pixels as stored
                upright = img.copy()
            if not with_alpha:
                return to_rgb(upright)
            from lora_offset.training.data.masks import alpha_channel

            return to_rgb(upright), alpha_channel(upright)


def fit_to_bucket(img: Image.Image, bucket: Size) -> Image.Image:
    """Resize to cover `bucket` and centre-crop, in one Lanczos resampling."""
    return resample(img, bucket, center_crop_box(img.size, bucket))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
