"""The range monitor: how bright and what colour a few probe prompts come out, at each sample step.

Offset noise exists so that a fine-tune reaches dark and bright images; what users report going wrong
with it is brightness and colour (a white garment turning black, blue turning red: kohya-ss/sd-scripts
#1173). At every sample step the monitor generates `monitor.images` images of each probe prompt from
fixed seeds (seed + i, so every step starts from the same noise and only the weights differ) and records
per prompt what `lora-offset eval` reports for them (evaluate.measure_prompt: the same generation and
the same brightness_stats): the mean luminance, its spread across the images, and the R, G, B means.

Where it goes: `{output_dir}/monitor.csv` (one row per step and prompt, rewritten atomically), the
trackers (TensorBoard / wandb: `monitor/<prompt>/luminance`, `.../luminance_spread`, `.../r`, `.../g`,
`.../b`), and at the end of the run `{output_dir}/monitor.png` (luminance and R, G, B means against the
step, one line per prompt). Step 0 is the base model (the adapter switched off), measured at the first
sample step of a run; a resumed run keeps the rows up to the step it resumes from.

It warns once per probe and kind (never again at later steps, nor after a resume that has the rows):
- colour flip: the base's dominant channel led the runner-up by at least `monitor.flip_margin` and another
  channel now leads it by at least as much. 0.03 of the [0, 1] range (about 8 of 255 levels, on a whole
  image's mean) is the default: a probe whose channels sit closer than that has no colour of its own to
  lose (a near-grey image, whose top channel swaps at any small change), and a whole-image cast of that
  size is a visible tint rather than rounding.
- dark probe rising: `monitor.dark_prompt` ("a very dark photo") is brighter than the base model's by more
  than `monitor.dark_rise`. 0.05 (about 13 of 255 levels of the mean) is the default: the fixed seeds make
  the measurement repeat exactly (to the bit, on one machine), so any rise is the weights' doing; 0.05 is a
  quarter of the 0.20 between what the demo's protocol predicts for a dark subject under offset noise
  (mean luminance <= 0.10) and under standard noise (>= 0.30), so a rise of that size is a real part of
  the range being lost, not a LoRA's ordinary drift.

Public surface (the demo uses it outside training): ProbeSettings, default_prompts, measure,
range_warnings, RangeMonitor (record, rows), read_csv, write_plot.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from lora_offset.fileio import atomic_write_text

log = logging.getLogger("lora_offset")

CSV_NAME = "monitor.csv"
PLOT_NAME = "monitor.png"
RANGE_PROMPTS = ("a very dark photo", "a very bright photo")
COLUMNS = ("step", "weights", "prompt", "mean_luminance", "std_luminance", "mean_r", "mean_g", "mean_b")
CHANNELS = ("R", "G", "B")


@dataclass(frozen=True)
class ProbeSettings:
    """What the monitor generates and when it warns (the [monitor] keys; see the module docstring)."""

    prompts: tuple[str, ...] = RANGE_PROMPTS
    images: int = 2
    steps: int = 10
    seed: int = 0
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    sampler: str = "ddim"
    clip_skip: int = 1
    max_token_length: int = 75
    flip_margin: float = 0.03
    dark_prompt: str = "a very dark photo"
    dark_rise: float = 0.05

    @classmethod
    def from_config(cls, config) -> "ProbeSettings":
        from lora_offset.training.data.buckets import resolution_size

        m, t = config.monitor, config.training
        width, height = (m.resolution, m.resolution) if m.resolution else resolution_size(config.dataset.resolution)
        return cls(prompts=tuple(m.prompts) or tuple(default_prompts(config)), images=m.images, steps=m.steps,
                   seed=m.seed, guidance_scale=t.sample_guidance_scale if m.guidance_scale is None else m.guidance_scale,
                   width=width, height=height, sampler=t.sample_sampler, clip_skip=t.clip_skip,
                   max_token_length=t.max_token_length, flip_margin=m.flip_margin, dark_prompt=m.dark_prompt,
                   dark_rise=m.dark_rise)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.images)]


def default_prompts(config) -> list[str]:
    """The instance prompt (the first instance subset's class_tokens), its class prompt (the first class
    subset's), then RANGE_PROMPTS; a prompt the config does not have is left out, repeats once."""
    subsets = [s for d in config.datasets for s in d.subsets]
    instance = next((s.class_tokens for s in subsets if not s.is_reg and s.class_tokens), None)
    klass = next((s.class_tokens for s in subsets if s.is_reg and s.class_tokens), None)
    return list(dict.fromkeys(p for p in (instance, klass, *RANGE_PROMPTS) if p))


def active(config) -> bool:
    """monitor.enabled, or (None) whether any samples are scheduled."""
    t = config.training
    sampling = bool(t.sample_every_steps or t.sample_every_n_epochs or t.sample_at_first)
    return sampling if config.monitor.enabled is None else config.monitor.enabled


# ------------------------------------------------------------------------------------- measuring

def measure(pipe, settings: ProbeSettings) -> dict[str, dict]:
    """{prompt: {mean_luminance, std_luminance, mean_rgb}} of `settings.images` images per probe from `pipe`
    (whatever scheduler and adapter it has), measured as `eval` measures (evaluate.measure_prompt)."""
    from lora_offset.experiments.evaluate import measure_prompt
    from lora_offset.experiments.sample import merged_lora

    measured = {}
    with merged_lora(pipe.unet, pipe.text_encoder):  # as eval samples: the adapter in the weights, restored after
        for prompt in settings.prompts:
            stats, _, _ = measure_prompt(pipe, prompt, settings.seeds, steps=settings.steps,
                                         guidance_scale=settings.guidance_scale, height=settings.height,
                                         width=settings.width, batch_size=settings.images, clip_skip=settings.clip_skip,
                                         max_token_length=settings.max_token_length)
            measured[prompt] = {k: stats[k] for k in ("mean_luminance", "std_luminance", "mean_rgb")}
    return measured


@contextlib.contextmanager
def adapters_off(*models) -> Iterator[None]:
    """The base model inside PEFT-adapted `models` for the block (every adapter layer bypassed); restored after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was_off = [layer.disable_adapters for layer in layers]
    flags = [(p, p.requires_grad) for model in models for p in model.parameters()]  # enable_adapters sets them
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, off in zip(layers, was_off):
            layer.enable_adapters(not off)
        for p, flag in flags:
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------- warnings (pure)

def _lead(rgb: Sequence[float]) -> tuple[int, float]:
    """(the dominant channel, its lead over the runner-up)."""
    top = max(range(3), key=lambda c: rgb[c])
    return top, rgb[top] - max(rgb[c] for c in range(3) if c != top)


def range_warnings(base: dict[str, dict], now: dict[str, dict], settings: ProbeSettings) -> list[tuple[str, str, str]]:
    """(kind, prompt, message) for each probe of `now` that crossed a threshold against `base` (same shape as
    measure's result): kind "colour_flip" or "dark_rise" (see the module docstring)."""
    found = []
    for prompt, stats in now.items():
        if prompt not in base:
            continue
        old_rgb, new_rgb = base[prompt]["mean_rgb"], stats["mean_rgb"]
        top, lead = _lead(old_rgb)
        challenger = max(range(3), key=lambda c: new_rgb[c])
        if lead >= settings.flip_margin and challenger != top and new_rgb[challenger] - new_rgb[top] >= settings.flip_margin:
            show = lambda rgb: " ".join(f"{n} {v:.3f}" for n, v in zip(CHANNELS, rgb))  # noqa: E731
            found.append(("colour_flip", prompt,
                          f"colour flip on {prompt!r}: its dominant channel was {CHANNELS[top]} in the base model "
                          f"({show(old_rgb)}), now {CHANNELS[challenger]} leads it by "
                          f"{new_rgb[challenger] - new_rgb[top]:.3f} ({show(new_rgb)}; monitor.flip_margin = "
                          f"{settings.flip_margin:g})"))
        rise = stats["mean_luminance"] - base[prompt]["mean_luminance"]
        if prompt == settings.dark_prompt and rise > settings.dark_rise:
            found.append(("dark_rise", prompt,
                          f"{prompt!r} is brighter than in the base model: mean luminance {stats['mean_luminance']:.3f} "
                          f"against {base[prompt]['mean_luminance']:.3f} (+{rise:.3f} > monitor.dark_rise = "
                          f"{settings.dark_rise:g}): the adapter is losing the dark end"))
    return found


# ------------------------------------------------------------------------------------- the record

def _row(step: int, weights: str, prompt: str, stats: dict) -> dict:
    r, g, b = stats["mean_rgb"]
    return {"step": int(step), "weights": weights, "prompt": prompt, "mean_luminance": float(stats["mean_luminance"]),
            "std_luminance": float(stats["std_luminance"]), "mean_r": float(r), "mean_g": float(g), "mean_b": float(b)}


def _stats(row: dict) -> dict:
    return {"mean_luminance": row["mean_luminance"], "std_luminance": row["std_luminance"],
            "mean_rgb": [row["mean_r"], row["mean_g"], row["mean_b"]]}


def read_csv(path: str | Path) -> list[dict]:
    """The rows of a monitor CSV, numbers as numbers."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{**r, "step": int(r["step"]), **{k: float(r[k]) for k in COLUMNS[3:]}} for r in rows]


def tag(prompt: str) -> str:
    """The trackers' name of a probe: `a_very_dark_photo`."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "prompt"


class RangeMonitor:
    """The run's record: rows in `csv_path`, metrics to `log_metrics(values, step=step)`, each warning once."""

    def __init__(self, csv_path: str | Path, settings: ProbeSettings,
                 log_metrics: Callable[..., None] | None = None, resume_step: int | None = None):
        self.path, self.settings, self.log_metrics = Path(csv_path), settings, log_metrics
        self.rows: list[dict] = []
        self.warned: set[tuple[str, str]] = set()
        self.scheduler = None  # at_sample_step's sampler
        if resume_step is not None and self.path.is_file():  # the rows a resumed run has already measured
            kept = [r for r in read_csv(self.path) if r["step"] <= resume_step]
            for step in sorted({r["step"] for r in kept}):
                self._add([r for r in kept if r["step"] == step], quiet=True)

    @property
    def base(self) -> dict[str, dict] | None:
        """The step-0 (base model) measurement, once there is one."""
        rows = {r["prompt"]: _stats(r) for r in self.rows if r["step"] == 0}
        return rows or None

    def record(self, step: int, weights: str, measured: dict[str, dict]) -> list[str]:
        """Add one step's measurement (`weights`: "base", "trained" or "ema"); returns the new warnings."""
        messages = self._add([_row(step, weights, p, s) for p, s in measured.items()])
        self._write()
        if self.log_metrics is not None:
            values = {}
            for prompt, s in measured.items():
                name = f"monitor/{tag(prompt)}"
                values |= {f"{name}/luminance": s["mean_luminance"], f"{name}/luminance_spread": s["std_luminance"],
                           **{f"{name}/{c.lower()}": v for c, v in zip(CHANNELS, s["mean_rgb"])}}
            self.log_metrics(values, step=step)
        return messages

    def _add(self, rows: list[dict], quiet: bool = False) -> list[str]:
        if rows:  # a step measured again (the base after a resume without rows) replaces its old rows
            self.rows = [r for r in self.rows if r["step"] != rows[0]["step"]] + rows
        base = self.base
        messages = []
        if base is not None and rows and rows[0]["step"] > 0:
            for kind, prompt, message in range_warnings(base, {r["prompt"]: _stats(r) for r in rows}, self.settings):
                if (kind, prompt) not in self.warned:
                    self.warned.add((kind, prompt))
                    messages.append(f"range monitor, step {rows[0]['step']}: {message}")
        if not quiet:
            for message in messages:
                log.warning("%s", message)
        return messages

    def _write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(self.rows, key=lambda r: r["step"]))
        atomic_write_text(self.path, text.getvalue())

    def at_sample_step(self, pipe, step: int, weights: str) -> list[str]:
        """In training: measure the base model first (once), then the adapter at `step` (> 0), with `pipe`
        given the monitor's sampler (`self.scheduler`, set by for_run)."""
        if self.scheduler is not None:
            pipe.scheduler = self.scheduler
        messages = []
        if self.base is None:
            with adapters_off(pipe.unet, pipe.text_encoder):
                messages += self.record(0, "base", measure(pipe, self.settings))
        if step > 0:
            messages += self.record(step, weights, measure(pipe, self.settings))
        return messages


def for_run(config, scheduler_config: dict, log_metrics, resume_step: int) -> RangeMonitor | None:
    """The training run's monitor (None when monitor.enabled is off, or None and no samples are scheduled):
    training.sample_sampler on the run's schedule (prediction type, zero terminal SNR), the CSV in the
    output folder, its rows kept up to `resume_step`."""
    if not active(config):
        return None
    from lora_offset.experiments.sample import sampling_scheduler

    settings = ProbeSettings.from_config(config)
    monitor = RangeMonitor(Path(config.training.output_dir) / CSV_NAME, settings, log_metrics, resume_step)
    monitor.scheduler = sampling_scheduler(scheduler_config, settings.sampler,
                                           prediction_type=config.model.prediction_type,
                                           zero_terminal_snr=config.noise.zero_terminal_snr)
    return monitor


# ------------------------------------------------------------------------------------- the plot

def write_plot(csv_path: str | Path, png_path: str | Path | None = None) -> Path:
    """Luminance (± its spread) and the R, G, B means against the step, one line per prompt: a PNG
    (default: monitor.png beside the CSV), written atomically. Step 0 is the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lora_offset.experiments.brightness_report import save_figure

    rows = read_csv(csv_path)
    png_path = Path(png_path) if png_path is not None else Path(csv_path).with_name(PLOT_NAME)
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [("mean_luminance", "mean luminance (± spread)"), ("mean_r", "R mean"), ("mean_g", "G mean"),
              ("mean_b", "B mean")]
    for ax, (column, title) in zip(axes.flat, panels):
        for prompt in prompts:
            mine = sorted((r for r in rows if r["prompt"] == prompt), key=lambda r: r["step"])
            steps = np.array([r["step"] for r in mine])
            values = np.array([r[column] for r in mine])
            line, = ax.plot(steps, values, marker="o", markersize=3, label=prompt if len(prompt) < 40 else prompt[:37] + "...")
            if column == "mean_luminance":
                spread = np.array([r["std_luminance"] for r in mine])
                ax.fill_between(steps, values - spread, values + spread, color=line.get_color(), alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step (0 = base model)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("range monitor: probe prompts, fixed seeds (Rec. 709 luminance, sRGB in [0, 1])", fontsize=10)
    return save_figure(fig, png_path)


__all__ = ["CSV_NAME", "PLOT_NAME", "RANGE_PROMPTS", "ProbeSettings", "RangeMonitor", "active", "adapters_off",
           "default_prompts", "for_run", "measure", "range_warnings", "read_csv", "tag", "write_plot"]
