"""The DreamBooth dataset: instance and class images, captions, aspect-ratio buckets, latent cache.

What a kohya sd-scripts user can expect, and the choices made where kohya leaves room:

* Images: .jpg .jpeg .png .webp .bmp .gif (any case). EXIF orientation is applied. Transparent images
  (RGBA, LA, palette or grey with a transparent colour) are composited on WHITE. 16-bit grey PNGs
  are scaled 0..65535 -> 0..255 (Pillow's own conversion would clip them to white). CMYK is
  converted through its embedded ICC profile when it has one. Animated GIF/WebP: the first frame.
* Skipped, with one warning listing every skipped file and why: empty, truncated or corrupt files,
  files that are not images whatever their name, images above Pillow's decompression-bomb limit
  (`PIL.Image.MAX_IMAGE_PIXELS`), and images smaller than 64 px on a side (upscaling a thumbnail
  to 512 px teaches the model blur). Other files in an image folder are ignored with one warning
  (caption files, dot-files and kohya's .npz latent caches silently).
* Captions: `<image stem><caption_extension>`, first non-empty line; read as UTF-8 (a BOM is
  fine), else as Latin-1 with a warning naming the file. No caption file, or an empty one: the
  subset's class_tokens. `shuffle_caption` shuffles the comma-separated tags after the first
  `keep_tokens` tags (kohya semantics).
* Sizes: every image size is a multiple of 64 (SD 1.x's VAE divides by 8 and its UNet halves the
  latent three more times). Without buckets: shorter side resized to `resolution`, then a
  centre crop. With buckets: kohya's bucket list (`bucket_resolutions`), each image in the bucket
  of nearest aspect ratio, resized to cover it (Lanczos), centre-cropped. `bucket_no_upscale`:
  the bucket is the image's own size rounded down to `bucket_reso_steps` (after shrinking it to
  `resolution`² area when larger), so small images are never enlarged. Bucket settings are
  ignored (and not validated) without `enable_bucket`, as in kohya.
* Batches are a pure function of (seed, step): `batch(step)` gives the same images, flips and
  caption shuffles in a new process, so resuming needs only the step number. Each batch holds
  images of one bucket; with regularization subsets it also holds as many class images, loaded
  at the same size, so every step has both halves of the DreamBooth loss.

Everything the user should read goes through `logging.getLogger("lora_offset.data")` (a child of
the "lora_offset" logger); errors the user can fix raise `UserError` with one line.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from lora_offset.errors import UserError
from lora_offset.fileio import atomic_path

log = logging.getLogger("lora_offset.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SIZE_MULTIPLE = 64  # SD 1.x: VAE factor 8 x three UNet downsamplings
MIN_IMAGE_SIDE = 64  # smaller images are skipped, not blown up
LATENT_FACTOR = 8
# Files that live in image folders and need no warning: OS litter and kohya's latent caches.
_SILENT_NAMES = {"thumbs.db", "desktop.ini"}
_SILENT_SUFFIXES = {".npz"}
_CACHE_FORMAT = "lora_offset.latents.v1"


# ---------------------------------------------------------------------------------------------
# config checks (config.py checks TOML input; these guard configs built in code as well)
# ---------------------------------------------------------------------------------------------

def validate_dataset_config(cfg) -> None:
    """Raise UserError for dataset settings that cannot work. `cfg` is a DatasetConfig."""
    for key in ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if key != "resolution" and not cfg.enable_bucket:
            continue
        value = getattr(cfg, key)
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            nearest = max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            raise UserError(f"dataset.{key} = {value} is not a multiple of 64; Stable Diffusion 1.x needs image sizes "
                            f"divisible by 64 (the VAE divides by 8, the UNet halves that 3 times): use {nearest}")
    if cfg.batch_size < 1:
        raise UserError(f"dataset.batch_size = {cfg.batch_size} must be at least 1")
    if cfg.enable_bucket:
        if cfg.min_bucket_reso > cfg.max_bucket_reso:
            raise UserError(f"dataset.min_bucket_reso = {cfg.min_bucket_reso} is larger than dataset.max_bucket_reso = "
                            f"{cfg.max_bucket_reso}; set min_bucket_reso <= max_bucket_reso")
        if cfg.bucket_reso_steps > cfg.resolution:
            raise UserError(f"dataset.bucket_reso_steps = {cfg.bucket_reso_steps} is larger than dataset.resolution = "
                            f"{cfg.resolution}; use bucket_reso_steps = 64")
        if not cfg.min_bucket_reso <= cfg.resolution <= cfg.max_bucket_reso:
            raise UserError(f"dataset.resolution = {cfg.resolution} must lie between dataset.min_bucket_reso = "
                            f"{cfg.min_bucket_reso} and dataset.max_bucket_reso = {cfg.max_bucket_reso}")
    for i, s in enumerate(cfg.subsets):
        if s.num_repeats < 1:
            raise UserError(f"dataset.subsets[{i}].num_repeats = {s.num_repeats} must be at least 1")
        if s.keep_tokens < 0:
            raise UserError(f"dataset.subsets[{i}].keep_tokens = {s.keep_tokens} must be 0 or more")


# ---------------------------------------------------------------------------------------------
# buckets: pure functions of sizes
# ---------------------------------------------------------------------------------------------

Size = tuple[int, int]  # (width, height), PIL's order


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """kohya's bucket list: (w, h) with area <= resolution², sides in [min_reso, max_reso] in `step`s.

    The square bucket is always present; every other bucket comes with its transpose.
    """
    max_area = resolution * resolution
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


def no_upscale_bucket(size: Size, resolution: int, step: int) -> Size:
    """bucket_no_upscale: the image's own size, shrunk to resolution² area if larger, floored to `step`.

    A side that floors to 0 gets one `step` (a slight upscale; images under 64 px are skipped anyway).
    """
    w, h = size
    max_area = resolution * resolution
    if w * h > max_area:
        scale = math.sqrt(max_area / (w * h))
        w, h = w * scale, h * scale
    return max(step, int(w // step) * step), max(step, int(h // step) * step)


def image_bucket(size: Size, cfg, buckets: Sequence[Size] | None = None) -> Size:
    """The training size of an image of `size` under DatasetConfig `cfg`."""
    if not cfg.enable_bucket:
        return cfg.resolution, cfg.resolution
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


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _one_line(e: BaseException) -> str:
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


def probe_image(path: Path) -> tuple[Size | None, str | None]:
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
        return None, f"truncated or corrupt ({_one_line(e)})"
    if min(size) < MIN_IMAGE_SIDE:
        return None, f"too small: {size[0]}x{size[1]} px; images need at least {MIN_IMAGE_SIDE} px on each side"
    return size, None


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


def load_image(path: Path, targets: Iterable[Size] = ()) -> Image.Image:
    """Decode `path` to an upright 8-bit RGB image (first frame of an animation).

    `targets`: sizes the image will be resized to cover; JPEGs are then decoded at the smallest
    1/2, 1/4 or 1/8 scale that still covers them all, which is much faster for large photos.
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
            return to_rgb(upright)


def fit_to_bucket(img: Image.Image, bucket: Size) -> Image.Image:
    """Resize to cover `bucket` and centre-crop, in one Lanczos resampling."""
    if img.size == bucket:
        return img
    box = center_crop_box(img.size, bucket)
    downscale = (box[2] - box[0]) > bucket[0]
    return img.resize(bucket, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0 if downscale else None)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------------

def read_caption_file(path: Path) -> tuple[str, bool]:
    """(caption, read_as_latin1). The caption is the first non-empty line, stripped."""
    data = path.read_bytes()
    try:
        text, latin1 = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, latin1 = data.decode("latin-1"), True
    for line in text.splitlines():
        if line.strip():
            return line.strip(), latin1
    return "", latin1


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.strip().split(",")]


def shuffle_tags(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """kohya shuffle_caption: the first `keep_tokens` comma-separated tags stay, the rest are shuffled."""
    tags = split_tags(caption)
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if len(flex) > 1:
        flex = [flex[i] for i in torch.randperm(len(flex), generator=generator).tolist()]
    return ", ".join(fixed + flex)


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """kohya's per-folder tag count: lower-cased comma-separated tags, each caption counted once per tag."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def check_caption_lengths(captions: Iterable[str], tokenizer, max_tokens: int = 77) -> list[str]:
    """Warn (one warning) about captions whose token count, BOS/EOS included, exceeds `max_tokens`.

    The text encoder sees only the first `max_tokens`; the rest is cut. Returns the long captions.
    """
    captions = list(dict.fromkeys(captions))
    if not captions:
        return []
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
    long = [(n, c) for n, c in zip(lengths, captions) if n > max_tokens]
    if long:
        lines = "\n".join(f"  ({n} tokens) {c}" for n, c in long)
        log.warning("%d caption(s) are longer than %d tokens; the text encoder sees only the first %d:\n%s",
                    len(long), max_tokens, max_tokens, lines)
    return [c for _, c in long]


# ---------------------------------------------------------------------------------------------
# folder scanning
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageEntry:
    path: Path
    caption: str
    subset: int  # index into the dataset's subsets
    is_reg: bool
    size: Size  # upright size in pixels
    bucket: Size  # training size (instance images; class images follow the instance batch)


@dataclass
class _ScanReport:
    ignored: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    latin1: list[Path] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)


def _list_folder(folder: Path, caption_extension: str) -> tuple[list[Path], list[Path]]:
    """(image files, ignored files) of one folder, sorted by name, not recursive."""
    images, ignored = [], []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        name = path.name.lower()
        if name.startswith(".") or name in _SILENT_NAMES:
            continue
        if path.is_dir():
            ignored.append(path)
        elif is_image_file(path):
            images.append(path)
        elif name.endswith(caption_extension.lower()) or path.suffix.lower() in _SILENT_SUFFIXES:
            continue
        else:
            ignored.append(path)
    return images, ignored


def _subset_folder(subset, index: int) -> Path:
    folder = Path(subset.image_dir).expanduser()
    key = f"dataset.subsets[{index}].image_dir"
    if not folder.exists():
        what = "class" if subset.is_reg else "training"
        raise UserError(f"{key} = '{subset.image_dir}' does not exist; create the folder and put the {what} images "
                        "in it, or fix the path")
    if not folder.is_dir():
        raise UserError(f"{key} = '{subset.image_dir}' is not a folder; image_dir must be a folder of images")
    return folder


def _scan_subset(subset, index: int, report: _ScanReport) -> list[tuple[Path, Size, str]]:
    """(path, size, caption) for every readable image of a subset; problems go to `report`."""
    if subset.is_reg and subset.num_class_images > 0 and not Path(subset.image_dir).expanduser().exists():
        return []  # the trainer generates the class images into it, then scans again
    folder = _subset_folder(subset, index)
    images, ignored = _list_folder(folder, subset.caption_extension)
    report.ignored.extend(ignored)
    found, uncaptioned = [], []
    for path in images:
        size, reason = probe_image(path)
        if reason is not None:
            report.skipped.append((path, reason))
            continue
        caption_path = path.with_name(path.stem + subset.caption_extension)
        caption = ""
        if caption_path.is_file():
            try:
                caption, latin1 = read_caption_file(caption_path)
            except OSError as e:
                raise UserError(f"cannot read caption file '{caption_path}' ({e.strerror}); fix its permissions")
            if latin1:
                report.latin1.append(caption_path)
            if not caption:
                report.empty_captions.append(caption_path)
        if not caption:
            if not subset.class_tokens:
                uncaptioned.append(path)
                continue
            caption = subset.class_tokens
        found.append((path, size, caption))
    if uncaptioned:
        example = uncaptioned[0]
        raise UserError(f"{len(uncaptioned)} image(s) in '{folder}' have no caption (e.g. '{example.stem}"
                        f"{subset.caption_extension}' is missing or empty) and dataset.subsets[{index}].class_tokens "
                        "is not set; add caption files, set class_tokens, or name the folder like '10_sks dog'")
    return found


def _warn_report(report: _ScanReport, max_ignored: int = 50) -> None:
    def listing(lines: list[str], limit: int | None = None) -> str:
        shown = lines if limit is None else lines[:limit]
        more = f"\n  ... and {len(lines) - len(shown)} more" if len(shown) < len(lines) else ""
        return "\n".join(f"  {line}" for line in shown) + more

    if report.skipped:  # every one: each is a training image the user meant to use
        log.warning("skipped %d unreadable image(s):\n%s", len(report.skipped),
                    listing([f"{p}: {reason}" for p, reason in report.skipped]))
    if report.ignored:
        log.warning("ignored %d file(s) that are neither images (%s) nor caption files:\n%s", len(report.ignored),
                    " ".join(IMAGE_EXTENSIONS),
                    listing([f"{p}/ (subfolders are not scanned)" if p.is_dir() else str(p) for p in report.ignored],
                            max_ignored))
    if report.latin1:
        log.warning("%d caption file(s) are not valid UTF-8 and were read as Latin-1 (save them as UTF-8):\n%s",
                    len(report.latin1), listing([str(p) for p in report.latin1]))
    if report.empty_captions:
        log.warning("%d caption file(s) are empty; their images use the subset's class_tokens:\n%s",
                    len(report.empty_captions), listing([str(p) for p in report.empty_captions]))


def missing_class_images(subset) -> int:
    """How many class images to generate: num_class_images minus the readable images already there."""
    folder = Path(subset.image_dir).expanduser()
    present = 0
    if folder.is_dir():
        images, _ = _list_folder(folder, subset.caption_extension)
        present = sum(1 for p in images if probe_image(p)[1] is None)
    return max(0, subset.num_class_images - present)


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One training step's images. Instance samples first, then class samples (is_reg True)."""

    captions: list[str]
    is_reg: torch.Tensor  # bool (N,)
    paths: list[Path]
    pixel_values: torch.Tensor | None = None  # float32 (N, 3, H, W) in [-1, 1], when latents are not cached
    latents: torch.Tensor | None = None  # float32 (N, 4, H/8, W/8), after cache_latents

    def __len__(self) -> int:
        return len(self.captions)


def _generator(seed: int, *parts) -> torch.Generator:
    """A torch generator seeded by a hash of (seed, *parts): independent streams per purpose and step."""
    digest = hashlib.sha256(repr((int(seed),) + parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class DreamBoothDataset:
    """Scanned images and the deterministic batch schedule. Build it with `build_dataset`."""

    def __init__(self, cfg, seed: int, subsets: Sequence, entries: list[ImageEntry],
                 skipped: list[tuple[Path, str]]):
        self.cfg = cfg
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

    # ---- facts -----------------------------------------------------------------------------
    @property
    def bucket_counts(self) -> dict[Size, int]:
        """Instance items (repeats included) per bucket (w, h)."""
        return {b: len(v) for b, v in self._by_bucket.items()}

    @property
    def captions(self) -> list[str]:
        """The distinct captions as written (before any shuffle), for check_caption_lengths."""
        return sorted({e.caption for e in self.entries})

    def caption_set(self) -> list[str] | None:
        """Every caption a batch can carry (for a text-embedding cache); None if a subset shuffles captions."""
        used = {e.subset for e in self.entries}
        if any(self.subsets[i].shuffle_caption for i in used):
            return None
        return self.captions

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
        epoch, index = divmod(step, self.steps_per_epoch)
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

    def batch(self, step: int) -> Batch:
        """The batch of global step `step`: same (seed, step), same batch, in any process."""
        instance, reg, size = self.batch_plan(step)
        g = _generator(self.seed, "augment", step)
        captions, flips = [], []
        for i in instance + reg:
            entry = self.entries[i]
            subset = self.subsets[entry.subset]
            flip = bool(torch.rand((), generator=g) < 0.5)  # drawn always, so one subset's setting moves no other's
            flips.append(flip and subset.flip_aug)
            caption = entry.caption
            if subset.shuffle_caption:
                caption = shuffle_tags(caption, subset.keep_tokens, g)
            captions.append(caption)
        indices = instance + reg
        batch = Batch(captions=captions,
                      is_reg=torch.tensor([False] * len(instance) + [True] * len(reg), dtype=torch.bool),
                      paths=[self.entries[i].path for i in indices])
        if self._latents is not None:
            batch.latents = torch.stack([self._latents[(i, size, f)] for i, f in zip(indices, flips)])
        else:
            pixels = []
            for i, flip in zip(indices, flips):
                tensor = self._pixels(i, [size])[size]
                pixels.append(tensor.flip(-1) if flip else tensor)
            batch.pixel_values = torch.stack(pixels)
        return batch

    def _pixels(self, index: int, sizes: Sequence[Size]) -> dict[Size, torch.Tensor]:
        path = self.entries[index].path
        try:
            img = load_image(path, sizes)
        except Exception as e:
            raise UserError(f"cannot read image '{path}' ({_one_line(e)}); it was readable when the dataset was "
                            "scanned: restore it or remove it and start again") from None
        return {s: to_tensor(fit_to_bucket(img, s)) for s in sizes}

    # ---- latent cache --------------------------------------------------------------------------
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], cache_dir: Path | str | None = None,
                      *, encoder_id: str = "", batch_size: int = 4) -> None:
        """Encode every (image, size, flip) a batch can use, once; afterwards `batch()` returns latents.

        `encode` maps float32 (N, 3, H, W) in [-1, 1] (CPU) to latents (N, 4, H/8, W/8), VAE scaling
        applied. Instance images are encoded at their bucket, class images at every instance bucket;
        both flips when the subset has flip_aug. With `cache_dir`, one safetensors file per image is
        reused while the image's mtime and size and `encoder_id` (say, the VAE's path) are unchanged.
        """
        sizes = list(self._by_bucket)
        needed: dict[int, list[tuple[Size, bool]]] = {}
        for i, entry in enumerate(self.entries):
            flips = (False, True) if self.subsets[entry.subset].flip_aug else (False,)
            entry_sizes = sizes if entry.is_reg else [entry.bucket]
            needed[i] = [(s, f) for s in entry_sizes for f in flips]
        latents: dict[tuple[int, Size, bool], torch.Tensor] = {}
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
            found = self._read_cache_file(folder, i, encoder_id) if folder is not None else {}
            missing = []
            for size, flip in wanted:
                name = _latent_name(size, flip)
                if name in found:
                    latents[(i, size, flip)] = found[name]
                    reused += 1
                else:
                    missing.append((size, flip))
            if not missing:
                continue
            dirty.add(i)
            pixels = self._pixels(i, sorted({s for s, _ in missing}))
            for size, flip in missing:
                px = pixels[size].flip(-1) if flip else pixels[size]
                pending.setdefault(size, []).append(((i, size, flip), px))
                if len(pending[size]) >= batch_size:
                    flush(size)
        for size in list(pending):
            flush(size)
        if folder is not None:
            for i in sorted(dirty):
                self._write_cache_file(folder, i, encoder_id, latents)
        total = sum(len(w) for w in needed.values())
        log.info("cached %d latents (%d reused from %s)", total, reused, folder if folder is not None else "-")
        self._latents = latents

    def _cache_file(self, folder: Path, index: int) -> Path:
        path = self.entries[index].path
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:40]
        return folder / f"{stem}-{digest}.safetensors"

    def _source_stamp(self, index: int, encoder_id: str) -> dict[str, str]:
        path = self.entries[index].path
        st = path.stat()
        return {"format": _CACHE_FORMAT, "source": str(path.resolve()), "source_mtime_ns": str(st.st_mtime_ns),
                "source_size": str(st.st_size), "encoder_id": encoder_id}

    def _read_cache_file(self, folder: Path, index: int, encoder_id: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        file = self._cache_file(folder, index)
        if not file.is_file():
            return {}
        try:
            with safe_open(str(file), framework="pt") as f:
                if f.metadata() != self._source_stamp(index, encoder_id):
                    return {}  # the image (or the VAE) changed since: encode again
                return {k: f.get_tensor(k).float() for k in f.keys()}
        except Exception as e:  # a damaged cache file is only a cache miss
            log.debug("ignoring latent cache file %s: %s", file, _one_line(e))
            return {}

    def _write_cache_file(self, folder: Path, index: int, encoder_id: str,
                          latents: dict[tuple[int, Size, bool], torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = self._read_cache_file(folder, index, encoder_id)  # keep other sizes from other runs
        for (i, size, flip), latent in latents.items():
            if i == index:
                tensors[_latent_name(size, flip)] = latent.contiguous()
        with atomic_path(self._cache_file(folder, index)) as tmp:
            save_file(tensors, str(tmp), metadata=self._source_stamp(index, encoder_id))


def _latent_name(size: Size, flip: bool) -> str:
    return f"{size[0]}x{size[1]}" + ("_flip" if flip else "")


def build_dataset(cfg, seed: int) -> DreamBoothDataset:
    """Scan every subset of DatasetConfig `cfg` and return the dataset. Cheap: no full decode of PNGs.

    Raises UserError for a missing folder, a subset with captionless images and no class_tokens,
    a regularization subset without readable images, or no readable instance image at all.
    Logs one warning per kind of problem (skipped images, ignored files, Latin-1 and empty captions).
    """
    validate_dataset_config(cfg)
    subsets = list(cfg.subsets)
    if not any(not s.is_reg for s in subsets):
        raise UserError("the dataset has no instance images configured: set dataset.train_data_dir or add "
                        "[[dataset.subsets]] with image_dir")
    buckets = None
    if cfg.enable_bucket and not cfg.bucket_no_upscale:
        buckets = bucket_resolutions(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    report = _ScanReport()
    entries: list[ImageEntry] = []
    empty_reg: list[int] = []
    for index, subset in enumerate(subsets):
        found = _scan_subset(subset, index, report)
        if subset.is_reg and not found and subset.num_class_images == 0:
            empty_reg.append(index)  # with num_class_images, the trainer fills it before training
        for path, size, caption in found:
            entries.append(ImageEntry(path=path, caption=caption, subset=index, is_reg=bool(subset.is_reg),
                                      size=size, bucket=image_bucket(size, cfg, buckets)))
    _warn_report(report)
    if not any(not e.is_reg for e in entries):
        folders = ", ".join(f"'{s.image_dir}'" for s in subsets if not s.is_reg)
        note = ""
        if report.skipped:
            note = f" ({len(report.skipped)} file(s) were skipped as unreadable, listed in the warning above)"
        raise UserError(f"no readable instance images in {folders}; put .jpg, .jpeg, .png, .webp, .bmp or .gif images "
                        f"there{note}")
    if empty_reg:
        index = empty_reg[0]
        raise UserError(f"dataset.subsets[{index}] (is_reg = true) has no readable class images in "
                        f"'{subsets[index].image_dir}'; add class images, set num_class_images to have them "
                        "generated, or remove the subset")
    return DreamBoothDataset(cfg, seed, subsets, entries, list(report.skipped))
