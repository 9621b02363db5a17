"""The demo's captioned image world: synthetic 128x128 pictures that follow their captions.

Every picture is a shape on a background, described by four attributes, each with its own word:

    brightness  very dark | dark | medium | bright | very bright   (the image's mean luminance)
    colour      red | green | blue | yellow | purple                (the shape's hue)
    shape       circle | square | triangle
    background  plain | striped | gradient

The caption names them in one template, "a {brightness} photo of a {colour} {shape} on a
{background} background", and each part is dropped independently (kept with probability
KEEP_WORD): "a dark photo of a red circle", "a photo on a striped background", "a photo". A share
EMPTY_CAPTION of the captions is empty, so classifier-free guidance has an unconditional model.
The rare token of the DreamBooth test ("sks") is not in the vocabulary and never appears.

Brightness is what the demo measures, so the brightness words bin the image's mean luminance
(Rec. 709) into five ranges with gaps between them; everything else (shape colour, background
pattern) is built around that level. Everything here is pure numpy and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 128
REC709 = np.array([0.2126, 0.7152, 0.0722])

# word -> range of the background's luminance (the image's mean follows it closely)
BRIGHTNESS = {
    "very dark": (0.03, 0.10),
    "dark": (0.14, 0.28),
    "medium": (0.38, 0.62),
    "bright": (0.72, 0.86),
    "very bright": (0.90, 0.97),
}
HUES = {
    "red": (1.0, 0.12, 0.12),
    "green": (0.1, 0.85, 0.15),
    "blue": (0.15, 0.25, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "purple": (0.65, 0.15, 0.9),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("plain", "striped", "gradient")
TEMPLATE_WORDS = ("a", "photo", "of", "on", "background")
KEEP_WORD = 0.7
EMPTY_CAPTION = 0.1
SHAPE_CONTRAST = 0.15  # the shape's luminance differs from the background's by this much
# Small shapes anywhere in the middle (v4; v3 had radius 0.2-0.28 at the centre): a large centred
# shape's colour moves the latent channel means so much that it can be read from x_t even at
# t = 999 (4.0 noise spreads for red vs blue, measured), so the base never needed the colour word
# (gate (c) failed). Smaller shapes in varying places leave 1.9 there: at high noise the colour
# must come from the text, as an object's colour does in SD.
RADIUS_RANGE = (0.10, 0.14)  # share of the image size
CENTRE_RANGE = (0.30, 0.70)  # x and y of the centre; the shape stays inside the picture


def vocabulary() -> list[str]:
    """Every word a caption can hold (multi-word brightness names split), sorted."""
    words = set(TEMPLATE_WORDS) | set(HUES) | set(SHAPES) | set(BACKGROUNDS)
    for name in BRIGHTNESS:
        words.update(name.split())
    return sorted(words)


@dataclass(frozen=True)
class Attributes:
    brightness: str
    level: float  # the background's luminance
    colour: str
    shape: str
    background: str
    centre: tuple[float, float]  # (x, y) in [0, 1]
    radius: float  # share of the image size
    angle: float  # gradient direction / stripe orientation
    contrast_sign: int  # +1: shape brighter than the background, -1: darker

    def caption(self, keep: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> str:
        """The template with the (brightness, object, colour, background) parts kept as `keep` says."""
        keep_brightness, keep_object, keep_colour, keep_background = keep
        words = ["a"]
        if keep_brightness:
            words.append(self.brightness)
        words.append("photo")
        if keep_object:
            words += ["of", "a"] + ([self.colour] if keep_colour else []) + [self.shape]
        if keep_background:
            words += ["on", "a", self.background, "background"]
        return " ".join(words)


def draw_attributes(rng: np.random.Generator, brightness: str | None = None) -> Attributes:
    """Random attributes (a given brightness word, or one of the five uniformly)."""
    if brightness is None:
        brightness = list(BRIGHTNESS)[int(rng.integers(len(BRIGHTNESS)))]
    low, high = BRIGHTNESS[brightness]
    level = float(rng.uniform(low, high))
    # Shapes stand out in luminance too; near the ends of the range there is room on one side only.
    sign = 1 if level < 0.3 else -1 if level > 0.7 else int(rng.choice([-1, 1]))
    return Attributes(
        brightness=brightness,
        level=level,
        colour=list(HUES)[int(rng.integers(len(HUES)))],
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        centre=(float(rng.uniform(*CENTRE_RANGE)), float(rng.uniform(*CENTRE_RANGE))),
        radius=float(rng.uniform(*RADIUS_RANGE)),
        angle=float(rng.uniform(0, 2 * np.pi)),
        contrast_sign=sign,
    )


def draw_caption(rng: np.random.Generator, attributes: Attributes) -> str:
    """A caption with each part kept with probability KEEP_WORD; empty with probability EMPTY_CAPTION."""
    if rng.random() < EMPTY_CAPTION:
        return ""
    keep = tuple(bool(k) for k in rng.random(4) < KEEP_WORD)
    return attributes.caption(keep)  # type: ignore[arg-type]


def caption_labels(caption: str) -> tuple[int, int, int, int]:
    """What a caption says, as class indices (brightness, colour, shape, background); 0 = the part
    was dropped, k = the k-th word of BRIGHTNESS / HUES / SHAPES / BACKGROUNDS (1-based)."""
    padded, words = f" {caption} ", caption.split()
    # Longest names first: " dark " is inside " very dark ", so "very dark" must be tried before "dark".
    said = next((name for name in sorted(BRIGHTNESS, key=len, reverse=True) if f" {name} " in padded), None)
    brightness = 0 if said is None else list(BRIGHTNESS).index(said) + 1
    pick = lambda names: next((k for k, w in enumerate(names, start=1) if w in words), 0)  # noqa: E731
    return brightness, pick(HUES), pick(SHAPES), pick(BACKGROUNDS)


def colour_at_luminance(hue: tuple[float, float, float], luminance: float) -> np.ndarray:
    """The hue shaded (darker) or tinted (toward white) to the given Rec. 709 luminance."""
    rgb = np.asarray(hue, dtype=np.float64)
    own = float(rgb @ REC709)
    if luminance <= own:
        return rgb * (luminance / own)
    t = (luminance - own) / (1.0 - own)
    return rgb + t * (1.0 - rgb)


def render(attributes: Attributes, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) float64 RGB in [0, 1]."""
    a = attributes
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size  # [0, 1)
    # Background: neutral grey at the level, with a pattern whose amplitude fits inside [0, 1].
    room = min(a.level, 1.0 - a.level)
    amplitude = min(0.08, 0.8 * room)
    along = np.cos(a.angle) * (xx - 0.5) + np.sin(a.angle) * (yy - 0.5)
    if a.background == "plain":
        pattern = np.zeros_like(xx)
    elif a.background == "gradient":
        pattern = amplitude * 2 * along  # along spans about [-0.7, 0.7]
    else:  # striped: bands 32 px wide at 128 px (two latent pixels), horizontal or vertical
        coord = xx if np.cos(a.angle) > 0 else yy
        pattern = amplitude * np.where((coord * 4) % 1.0 < 0.5, 1.0, -1.0)
    img = np.repeat((a.level + pattern)[..., None], 3, axis=2)
    # Shape: the hue at the background's luminance plus or minus SHAPE_CONTRAST.
    shape_luminance = float(np.clip(a.level + a.contrast_sign * SHAPE_CONTRAST, 0.01, 0.99))
    colour = colour_at_luminance(HUES[a.colour], shape_luminance)
    cx, cy = a.centre
    r = a.radius
    if a.shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    elif a.shape == "square":
        half = r * 0.886  # the square of the circle's area
        mask = (np.abs(xx - cx) < half) & (np.abs(yy - cy) < half)
    else:  # triangle pointing up, about the circle's area
        h = r * 2.0
        top = cy - h / 2
        rel = (yy - top) / h  # 0 at the apex, 1 at the base
        mask = (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * r * 1.15)
    img[mask] = colour
    return np.clip(img, 0.0, 1.0)


def mean_luminance(images: np.ndarray) -> np.ndarray:
    """Per-image mean Rec. 709 luminance of (N, H, W, 3) images in [0, 1]."""
    return (np.asarray(images, dtype=np.float64) @ REC709).mean(axis=(1, 2))


def draw_dataset(n: int, seed: int, brightness: str | None = None,
                 size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Attributes]]:
    """n images (n, size, size, 3) float32 in [0, 1] and their attributes."""
    rng = np.random.default_rng(seed)
    attrs = [draw_attributes(rng, brightness) for _ in range(n)]
    images = np.stack([render(a, size) for a in attrs]).astype(np.float32)
    return images, attrs
