"""Brightness statistics of generated images and the files of an `eval` report (lora_offset.experiments.evaluate).

The metrics are pure functions of image arrays; write_histogram_plot and render_markdown turn a
report into its PNG and markdown.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from lora_offset.fileio import atomic_write

REC709 = np.array([0.2126, 0.7152, 0.0722])
DARK, BRIGHT = 0.05, 0.95
HISTOGRAM_BINS = 50


# ----------------------------------------------------------------------------- metrics (pure)

def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of channel-last RGB values: (..., 3) -> (...). No clamping, no linearization."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected channel-last RGB (..., 3), got shape {rgb.shape}")
    return rgb @ REC709


def brightness_stats(images: np.ndarray, unclamped: np.ndarray | None = None) -> dict:
    """Brightness statistics of N images (N, H, W, 3) with values in [0, 1].

    `unclamped` is the same images before clamping (any range); its mean luminance shows whether
    a gray-looking mean is real or clamped noise. Returns plain floats and lists (JSON-ready).
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (N, H, W, 3), got shape {images.shape}")
    lum = luminance(images)  # (N, H, W)
    per_image = lum.reshape(lum.shape[0], -1).mean(axis=1)
    stats = {
        "mean_luminance": float(per_image.mean()),
        "std_luminance": float(per_image.std()),
        # how much an image varies inside itself (0 = a flat field), averaged over images
        "within_image_std": float(lum.reshape(lum.shape[0], -1).std(axis=1).mean()),
        "mean_luminance_unclamped": float(luminance(unclamped).mean()) if unclamped is not None else None,
        "p1": float(np.percentile(lum, 1)),
        "p99": float(np.percentile(lum, 99)),
        "frac_below_0_05": float((lum < DARK).mean()),
        "frac_above_0_95": float((lum > BRIGHT).mean()),
        "per_image_mean": [float(v) for v in per_image],
        # R, G, B: the mean over images of each image's channel mean (a colour cast, a colour flip)
        "mean_rgb": [float(v) for v in images.reshape(images.shape[0], -1, 3).mean(axis=1).mean(axis=0)],
    }
    return stats


def luminance_histogram(images: np.ndarray, bins: int = HISTOGRAM_BINS) -> list[float]:
    """Fraction of pixels in each of `bins` equal luminance bins over [0, 1] (sums to 1)."""
    lum = luminance(np.asarray(images, dtype=np.float64)).ravel()
    counts, _ = np.histogram(np.clip(lum, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return [float(c) for c in counts / max(lum.size, 1)]


def image_grid(images: Sequence, cols: int | None = None):
    """Tile equally sized PIL images into one image, row by row (ceil(sqrt(n)) columns by default)."""
    from PIL import Image

    if not images:
        raise ValueError("no images to tile")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# ----------------------------------------------------------------------------- report files

def save_figure(fig, path: Path) -> Path:
    """Lay out a matplotlib figure, write it as a PNG atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def write_histogram_plot(histograms: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """One panel per prompt, one luminance-histogram curve per setting; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = list(dict.fromkeys(p for per_prompt in histograms.values() for p in per_prompt))
    fig, axes = plt.subplots(len(prompts), 1, figsize=(7, 2.8 * len(prompts)), squeeze=False)
    for ax, prompt in zip(axes[:, 0], prompts):
        for name, per_prompt in histograms.items():
            if prompt in per_prompt:
                fractions = np.asarray(per_prompt[prompt])
                centers = (np.arange(fractions.size) + 0.5) / fractions.size
                ax.plot(centers, fractions * 100, label=name)
        ax.set_title(prompt if len(prompt) < 70 else prompt[:67] + "...", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("luminance (Rec. 709, sRGB in [0, 1])")
        ax.set_ylabel("% of pixels")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# Brightness report",
        "",
        f"Base `{cfg['base']}`, {cfg['n']} images per setting and prompt (seeds {cfg['seed']}..{cfg['seed'] + cfg['n'] - 1}), "
        f"{cfg['steps']} {cfg.get('sampler', 'ddim')} steps, guidance {cfg['guidance_scale']}, {cfg['resolution']}x{cfg['resolution']}.",
        "Luminance: Rec. 709 (0.2126 R + 0.7152 G + 0.0722 B) on sRGB values in [0, 1]. "
        "*Unclamped* is the mean before clamping the decode to [0, 1]: when it differs much from the "
        "mean, the images are noisy rather than gray.",
        "",
    ]
    leak = cfg.get("start_from_leak")
    if leak:
        lines += [f"Started from the signal leak of `{leak['source']}` ({leak['n']} images; latent channel means "
                  f"{', '.join(f'{v:.3f}' for v in leak['mean'])} ± {', '.join(f'{v:.3f}' for v in leak['std'])}, "
                  f"× {leak['fraction']:g}) instead of pure noise.", ""]
    lines += [
        "| setting | prompt | mean luminance ± spread | unclamped | p1 | p99 | frac < 0.05 | frac > 0.95 | grid |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["settings"].items():
        label = name if entry["lora"] is None else f"{name} (×{entry['weight']:g})"
        for prompt, s in entry["prompts"].items():
            unclamped = "" if s["mean_luminance_unclamped"] is None else f"{s['mean_luminance_unclamped']:.3f}"
            lines.append(
                f"| {label} | {prompt.replace('|', '/')} | {s['mean_luminance']:.3f} ± {s['std_luminance']:.3f} | "
                f"{unclamped} | {s['p1']:.3f} | {s['p99']:.3f} | {s['frac_below_0_05']:.3f} | "
                f"{s['frac_above_0_95']:.3f} | [grid]({s['grid']}) |"
            )
    lines += ["", "Sampling per setting (from each LoRA's metadata):", ""]
    for name, entry in report["settings"].items():
        sm = entry["sampling"]
        lines.append(f"- {name}: {sm['prediction_type']}, zero terminal SNR {sm['zero_terminal_snr']}, "
                     f"{sm['timestep_spacing']} timesteps, guidance rescale {sm['guidance_rescale']}")
    lines += ["", f"![luminance histograms]({report['plot']})", ""]
    return "\n".join(lines)
