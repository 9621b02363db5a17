"""Folder scanning: the readable images of each subset, their sizes and captions; one warning per kind of problem."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lora_offset.errors import UserError
from lora_offset.training.data.buckets import Size
from lora_offset.training.data.captions import read_caption_file
from lora_offset.training.data.images import IMAGE_EXTENSIONS, TOO_SMALL, is_image_file, probe_image

log = logging.getLogger("lora_offset.data")
# Files that live in image folders and need no warning: OS litter and kohya's latent caches.
_SILENT_NAMES = {"thumbs.db", "desktop.ini"}
_SILENT_SUFFIXES = {".npz"}


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    caption: str
    subset: int  # index into the dataset's subsets
    is_reg: bool
    size: Size  # upright size in pixels
    bucket: Size  # training size (instance images; class images follow the instance batch)
    mask: Path | None = None  # its mask image in the subset's conditioning_data_dir


@dataclass
class ScanReport:
    ignored: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable or too small: not trained on
    upscaled: list[tuple[Path, Size, Size]] = field(default_factory=list)  # (path, size, training size)
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


def _subset_folder(subset, key: str) -> Path:
    folder = Path(subset.image_dir).expanduser()
    if not folder.exists():
        what = "class" if subset.is_reg else "training"
        raise UserError(f"{key} = '{subset.image_dir}' does not exist; create the folder and put the {what} images "
                        "in it, or fix the path")
    if not folder.is_dir():
        raise UserError(f"{key} = '{subset.image_dir}' is not a folder; image_dir must be a folder of images")
    return folder


def scan_subset(subset, where: str, report: ScanReport) -> list[tuple[Path, Size, str]]:
    """(path, size, caption) for every readable image of a subset (`where`: its key, e.g.
    "dataset.subsets[0]"); problems go to `report`."""
    if subset.is_reg and subset.num_class_images > 0 and not Path(subset.image_dir).expanduser().exists():
        return []  # the trainer generates the class images into it, then scans again
    folder = _subset_folder(subset, f"{where}.image_dir")
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
                caption, latin1 = read_caption_file(caption_path, all_lines=subset.enable_wildcard)
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
                        f"{subset.caption_extension}' is missing or empty) and {where}.class_tokens "
                        "is not set; add caption files, set class_tokens, or name the folder like '10_sks dog'")
    return found


def pair_masks(subset, where: str, found: list[tuple[Path, Size, str]]) -> list[Path]:
    """The mask image of each found image in the subset's conditioning_data_dir (kohya's layout: same stem,
    same size). A missing or unreadable mask, or one of another size, is an error naming the files."""
    from lora_offset.training.data.masks import find_conditioning_image

    key = f"{where}.conditioning_data_dir"
    folder = Path(subset.conditioning_data_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key} = '{subset.conditioning_data_dir}' is not a folder; it must hold one mask image "
                        "per training image, with the same name")
    masks, missing = [], []
    for path, size, _ in found:
        mask = find_conditioning_image(folder, path.stem)
        if mask is None:
            missing.append(path.stem)
            continue
        mask_size, reason = probe_image(mask, min_side=1)
        if reason is not None:
            raise UserError(f"mask '{mask}' of '{path}' cannot be used: {reason}")
        if mask_size != size:
            raise UserError(f"mask '{mask}' is {mask_size[0]}x{mask_size[1]} px but its image '{path}' is "
                            f"{size[0]}x{size[1]} px; a mask must have its image's size")
        masks.append(mask)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{len(missing)} image(s) of '{subset.image_dir}' have no mask in {key} = "
                        f"'{subset.conditioning_data_dir}' (an image with the same name): {shown}")
    paired = set(masks)
    extra = [p.name for p in sorted(folder.iterdir()) if is_image_file(p) and p not in paired]
    if extra:  # kohya stops here; an unused mask harms nothing, but it may be a misnamed one
        log.warning("%s = '%s': %d image(s) match no training image and are not used: %s", key,
                    subset.conditioning_data_dir, len(extra), ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""))
    return masks


def warn_report(report: ScanReport, max_ignored: int = 50) -> None:
    def listing(lines: list[str], limit: int | None = None) -> str:
        shown = lines if limit is None else lines[:limit]
        more = f"\n  ... and {len(lines) - len(shown)} more" if len(shown) < len(lines) else ""
        return "\n".join(f"  {line}" for line in shown) + more

    # Every skipped file is listed: each is a training image the user meant to use. A readable image
    # that is merely small is not called unreadable: its fix is different.
    unreadable = [(p, r) for p, r in report.skipped if not r.startswith(TOO_SMALL)]
    too_small = [(p, r) for p, r in report.skipped if r.startswith(TOO_SMALL)]
    if unreadable:
        log.warning("skipped %d unreadable image(s):\n%s", len(unreadable),
                    listing([f"{p}: {reason}" for p, reason in unreadable]))
    if too_small:
        log.warning("skipped %d image(s) that are too small to train on:\n%s", len(too_small),
                    listing([f"{p}: {reason}" for p, reason in too_small]))
    if report.upscaled:
        log.warning("%d image(s) are smaller than the size they train at and are upscaled, which blurs them; use "
                    "larger images, a lower dataset.resolution, or dataset.enable_bucket = true with "
                    "dataset.bucket_no_upscale = true (each image trains at its own size):\n%s", len(report.upscaled),
                    listing([f"{p}: {w}x{h} px, trains at {bw}x{bh}" for p, (w, h), (bw, bh) in report.upscaled]))
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
