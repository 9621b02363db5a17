"""`lora-offset make-dataset`: synthetic training sets for offset-noise experiments.

  solid   N images of one colour (the classic test: SD 1.x cannot learn a solid black image
          with standard noise).
  varied  N images of widely varying brightness: a uniform background level drawn from [0, 1]
          plus a colour tint, a linear gradient, up to three shapes and fine texture; a base
          model's data should span dark to bright, so that its gray-clustered samples are the
          noise schedule's doing and not the data's.

Image functions are pure (`solid_image`, `varied_image`) so the demo can import them; files are
written atomically as NNNN.png with an optional NNNN.txt caption beside each.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from lora_offset.arguments import SEED_MAX, Number, OutputPath
from lora_offset.errors import UserError
from lora_offset.fileio import atomic_write, atomic_write_text

NAMED_COLORS = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
}
_HEX = re.compile(r"#([0-9a-fA-F]{6})")


def parse_color(text: str) -> tuple[int, int, int]:
    """'black' | 'white' | 'gray' | 'red' | 'green' | 'blue' | '#RRGGBB' -> (r, g, b) in 0..255."""
    name = str(text).strip().lower()
    if name in NAMED_COLORS:
        return NAMED_COLORS[name]
    m = _HEX.fullmatch(name)
    if not m:
        raise UserError(f"--color {text!r}: use one of {', '.join(NAMED_COLORS)} or #RRGGBB (e.g. #1a2b3c)")
    h = m.group(1)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def solid_image(color: str | tuple[int, int, int], size: int):
    """A size x size RGB image filled with one colour (a name, '#RRGGBB' or an (r, g, b) tuple)."""
    from PIL import Image

    rgb = parse_color(color) if isinstance(color, str) else tuple(int(c) for c in color)
    return Image.new("RGB", (int(size), int(size)), rgb)


def varied_array(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float array in [0, 1]: background level U(0, 1) + tint + gradient + shapes + texture.

    The background level dominates the image mean, so a set of these spans dark to bright nearly
    uniformly; the rest gives the model structure to learn (a diffusion model trained on flat
    fields alone never learns anything but the mean).
    """
    size = int(size)
    level = rng.uniform(0.0, 1.0)
    tint = rng.normal(0.0, 0.08, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.0, 0.25) * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = np.empty((size, size, 3))
    img[:] = level + tint
    img += gradient[..., None]
    for _ in range(int(rng.integers(0, 4))):
        color = np.clip(level + rng.normal(0.0, 0.3, size=3), 0.0, 1.0)
        cy, cx = rng.uniform(-0.4, 0.4, size=2)
        r = rng.uniform(0.08, 0.3)
        if rng.random() < 0.5:  # disc
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        else:  # axis-aligned rectangle
            h = rng.uniform(0.08, 0.3)
            mask = (np.abs(yy - cy) < h) & (np.abs(xx - cx) < r)
        img[mask] = color
    img += rng.normal(0.0, rng.uniform(0.0, 0.04), size=img.shape)  # fine texture
    return np.clip(img, 0.0, 1.0)


def varied_image(rng: np.random.Generator, size: int):
    """`varied_array` as an RGB PIL image."""
    from PIL import Image

    return Image.fromarray(np.round(varied_array(rng, size) * 255).astype(np.uint8), mode="RGB")


def write_images(images, out: str | Path, caption: str | None = None) -> list[Path]:
    """Write PIL images as out/0000.png, 0001.png, ... (and NNNN.txt captions); return the PNG paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    paths = []
    for i, image in enumerate(images):
        path = out / f"{i:04d}.png"
        atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        if caption is not None:
            atomic_write_text(path.with_suffix(".txt"), caption + "\n")
        paths.append(path)
    return paths


def make_solid(color: str, n: int, size: int, out: str | Path, caption: str | None = None) -> list[Path]:
    _check_counts(n, size)
    image = solid_image(color, size)
    return write_images((image for _ in range(n)), out, caption)


def make_varied(n: int, size: int, out: str | Path, caption: str | None = None, seed: int = 0) -> list[Path]:
    _check_counts(n, size)
    rng = np.random.default_rng(seed)
    return write_images((varied_image(rng, size) for _ in range(n)), out, caption)


def _check_counts(n: int, size: int) -> None:
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if size < 8:
        raise UserError(f"--size must be at least 8 pixels, got {size}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    solid = kinds.add_parser("solid", help="N images of one colour", description="N images of one colour")
    solid.add_argument("--color", required=True, help="black, white, gray, red, green, blue or #RRGGBB")
    varied = kinds.add_parser("varied", help="N synthetic images of widely varying brightness",
                              description="N synthetic images of widely varying brightness")
    varied.add_argument("--seed", type=Number(int, 0, SEED_MAX), default=0, help="random seed (default 0)")
    for p in (solid, varied):
        p.add_argument("--n", type=Number(int, 1, 100000), required=True, help="number of images")
        p.add_argument("--size", type=Number(int, 8, 4096), default=512, help="image width and height in pixels (default 512)")
        p.add_argument("--caption", default=None, metavar="TEXT", help="also write NNNN.txt with this caption")
        p.add_argument("out", metavar="OUT", type=OutputPath("folder"), help="output folder")


def run(args: argparse.Namespace) -> int:
    if args.kind == "solid":
        paths = make_solid(args.color, args.n, args.size, args.out, args.caption)
    else:
        paths = make_varied(args.n, args.size, args.out, args.caption, seed=args.seed)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0
