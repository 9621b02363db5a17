"""`lora-offset eval`: generate images from a base model and each LoRA, and report their brightness.

Offset noise exists because SD 1.x cannot make very dark or very bright images: its samples
cluster at mid-gray. This command measures that directly. For each setting (the base model, then
each LoRA at its weight) and each prompt it generates N images from the same seeds (seed + i),
and reports, on Rec. 709 luminance of the sRGB values in [0, 1]:
  mean luminance (mean over images of each image's mean) and its spread (std across images),
  the mean of the UNCLAMPED decode (noise clamped to [0, 1] averages 0.5 and fakes a gray result),
  the 1st / 99th percentile of pixel luminance, the fraction of pixels below 0.05 and above 0.95.
Each LoRA is sampled the way it was trained (read from its safetensors metadata): a
zero-terminal-SNR / v-prediction LoRA gets rescaled betas, trailing timesteps, guidance rescale
0.7 and v-prediction.

Outputs (all written atomically) in --out: report.json, report.md, one image grid per setting and
prompt, and luminance-histograms.png.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lora_offset.arguments import SEED_MAX, FileAndNumber, Number, OutputPath, split_file_and_number
from lora_offset.errors import UserError
from lora_offset.experiments.brightness_report import (
    brightness_stats, image_grid, luminance_histogram, render_markdown, write_histogram_plot)
from lora_offset.fileio import atomic_write, atomic_write_text, check_readable

PLOT_NAME = "luminance-histograms.png"
# A LoRA's weight, as the web UIs' <lora:name:WEIGHT>: negative weights invert it.
WEIGHT = Number(float, -100, 100, why="a negative weight inverts the LoRA")


# ----------------------------------------------------------------------------- sampling settings

@dataclass(frozen=True)
class LoraSpec:
    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class SamplingSettings:
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False


def parse_lora_spec(text: str) -> LoraSpec:
    """'FILE' or 'FILE:WEIGHT' -> LoraSpec. A colon followed by a non-number is part of the path."""
    path, weight = split_file_and_number(text)
    return LoraSpec(Path(path), 1.0 if weight is None else float(weight))


def _true(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def sampling_from_metadata(metadata: dict | None) -> SamplingSettings:
    """How a LoRA must be sampled, from its safetensors metadata (kohya and modelspec fields).

    v-prediction: ss_base_model_version "sd_v1_v", ss_v_parameterization "True", or
    modelspec.prediction_type / ss_prediction_type "v" / "v_prediction". Zero terminal SNR:
    ss_zero_terminal_snr "True". With zero terminal SNR alpha_bar_T = 0, where an epsilon model
    cannot predict x0 (the first DDIM step divides by zero): a file that says zero terminal SNR and
    nothing about the prediction type is taken as v-prediction (Lin et al. pair the two, and so
    does our trainer); one that explicitly says epsilon (kohya allows that for training) is
    sampled as kohya samples it, on the standard schedule.
    """
    md = metadata or {}
    v_values = ("v", "v_prediction")
    v_pred = (
        str(md.get("ss_base_model_version", "")).endswith("_v")
        or _true(md.get("ss_v_parameterization", "False"))
        or md.get("ss_prediction_type") in v_values
        or md.get("modelspec.prediction_type") in v_values
    )
    explicit_eps = not v_pred and (
        "ss_v_parameterization" in md or md.get("ss_prediction_type") == "epsilon"
        or md.get("modelspec.prediction_type") == "epsilon"
    )
    ztsnr = _true(md.get("ss_zero_terminal_snr", "False"))
    if ztsnr and explicit_eps:
        return SamplingSettings("epsilon", False)
    return SamplingSettings("v_prediction" if (v_pred or ztsnr) else "epsilon", ztsnr)


def sampling_from_scheduler(scheduler_config: dict) -> SamplingSettings:
    """How the base model itself is sampled: its scheduler config's prediction type and schedule."""
    pred = scheduler_config.get("prediction_type", "epsilon")
    return SamplingSettings(pred if pred in ("epsilon", "v_prediction") else "epsilon",
                            bool(scheduler_config.get("rescale_betas_zero_snr", False)))


def read_lora_file(path: Path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a .safetensors LoRA file; UserError for a missing or unreadable one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a LoRA .safetensors file")
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: eval reads LoRA files in .safetensors format only (convert it with `lora-offset convert`)")
    check_readable(path)  # a PermissionError stays one, rather than "not readable (No such file)"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    lycoris = next((k for k in state if k.partition(".")[2].startswith(("hada_", "lokr_"))), None)
    if lycoris is not None:  # diffusers' load_lora_weights, which eval samples with, cannot read LyCORIS keys
        raise UserError(f"{path}: is a LoHa/LoKr file ({lycoris}), which diffusers cannot load: bake it into the "
                        "base with `lora-offset merge --base BASE --lora FILE --out MERGED` and evaluate MERGED as --base")
    return state, metadata


# ----------------------------------------------------------------------------- models

def _load_base(path: str, allow_pickle: bool) -> dict:
    """Base model components {unet, vae, text_encoder, tokenizer, scheduler_config}: a diffusers
    folder, a hub id or a single-file SD 1.x checkpoint (lora_offset.training.models does the work)."""
    from lora_offset.config import ModelConfig
    from lora_offset.training.models import load_base_model

    import torch

    # Half precision on a GPU (what the web UIs sample with; half the memory), fp32 on a CPU.
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    base = load_base_model(ModelConfig(pretrained=str(path), allow_pickle=allow_pickle), dtype=dtype)
    return {**base.components(), "scheduler_config": dict(base.scheduler_config)}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- the evaluation

def _setting_names(loras: Sequence[LoraSpec]) -> list[str]:
    names, seen = ["base"], {"base"}
    for spec in loras:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.path.stem) or "lora"
        name = stem if spec.weight == 1.0 else f"{stem}@{spec.weight:g}"
        candidate, k = name, 2
        while candidate in seen:
            candidate, k = f"{name}-{k}", k + 1
        seen.add(candidate)
        names.append(candidate)
    return names


def _slug(text: str, limit: int = 40) -> str:
    slug = "-".join(p for p in re.sub(r"[^a-z0-9]+", "-", text.lower()).split("-") if p)
    return slug[:limit] or "prompt"


def _versions() -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    from lora_offset import __version__

    return {"lora_offset": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "numpy": np.__version__, "platform": platform.platform()}


def evaluate(base: str, loras: Sequence[LoraSpec | str | tuple] = (), prompts: Sequence[str] = ("a photo",),
             n: int = 16, steps: int = 30, seed: int = 0, out: str | os.PathLike = "eval", *,
             guidance_scale: float = 7.5, resolution: int = 512, allow_pickle: bool = False,
             negative_prompt: str = "", batch_size: int = 4, clip_skip: int = 1, components: dict | None = None,
             start_from_leak=None, leak_fraction: float = 1.0, include_base: bool = True,
             sampler: str = "ddim", max_token_length: int = 75,
             log: Callable[[str], None] | None = None,
             on_decoded: Callable[[str, str, np.ndarray], None] | None = None) -> dict:
    """Generate N images per setting and prompt, write the report files into `out`, return the report.

    `base`: diffusers folder, hub id or single-file SD 1.x checkpoint (see lora_offset.training.models).
    `loras`: LoraSpec, "FILE[:WEIGHT]" strings or (path, weight) pairs. `components` (optional):
    already-loaded base components {unet, vae, text_encoder, tokenizer, and scheduler_config (a
    dict) or scheduler} used instead of loading `base` (the demo and tests use it); they must not
    carry a LoRA already, and are moved to the evaluation device. `log` gets one progress line
    per setting and prompt. `clip_skip`: 2 encodes the prompts from CLIP's penultimate layer, as a
    LoRA trained with training.clip_skip = 2 expects (lora_offset.training.text). `sampler`: kohya's
    sampler names (ddim, euler_a, dpm++_2m_karras, ...; lora_offset.experiments.sample.SAMPLERS), built
    from the model's training scheduler; `max_token_length` 75 | 150 | 225 (training.max_token_length).

    `start_from_leak`: a folder of images (or a lora_offset.experiments.leak.LeakStatistics): every
    image starts from sqrt(1 - abar) * noise + sqrt(abar) * leak, the leak's channel means drawn per
    image from the folder's latent channel-mean statistics and scaled by `leak_fraction` (Everaert
    et al. 2024; a training-free brightness fix). `include_base=False` skips the base-model setting.
    `on_decoded(setting, prompt, decoded)` gets each setting's and prompt's raw decodes (N, 3, H, W),
    so a caller that needs the images themselves does not generate them a second time (the demo).
    """
    from lora_offset.experiments.sample import (SAMPLERS, ZTSNR_GUIDANCE_RESCALE, build_pipeline, merged_lora,
                                                sampler_supports_zero_terminal_snr, to_pil, zero_terminal_snr_samplers)
    from lora_offset.training.text import MAX_TOKEN_LENGTHS

    specs = [s if isinstance(s, LoraSpec) else parse_lora_spec(s) if isinstance(s, str) else LoraSpec(Path(s[0]), float(s[1]))
             for s in loras]
    prompts = list(prompts)
    if not prompts:
        raise UserError("give at least one --prompt")
    bad_weights = [s for s in specs if not math.isfinite(s.weight)]
    if bad_weights:
        raise UserError(f"{bad_weights[0].path}: the LoRA weight {bad_weights[0].weight} is not a finite number")
    if not math.isfinite(guidance_scale) or not math.isfinite(leak_fraction):
        raise UserError(f"guidance {guidance_scale} and leak fraction {leak_fraction} must be finite numbers")
    if n < 1 or steps < 1:
        raise UserError(f"--n and --steps must be at least 1 (got n={n}, steps={steps})")
    if clip_skip < 1:
        raise UserError(f"--clip-skip must be at least 1 (1 = CLIP's last layer), got {clip_skip}")
    if resolution < 8 or resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8, got {resolution}")
    if sampler not in SAMPLERS:
        close = difflib.get_close_matches(sampler, list(SAMPLERS), n=1, cutoff=0.5)
        raise UserError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise UserError(f"--max-token-length must be one of {', '.join(map(str, MAX_TOKEN_LENGTHS))}, got {max_token_length}")
    lora_files = [read_lora_file(s.path) for s in specs]  # fail fast, before loading the base model
    for spec, (_, metadata) in zip(specs, lora_files):
        if sampling_from_metadata(metadata).zero_terminal_snr and not sampler_supports_zero_terminal_snr(sampler):
            usable = ", ".join(zero_terminal_snr_samplers())
            raise UserError(f"{spec.path}: was trained with zero terminal SNR, which --sampler {sampler} cannot "
                            f"sample; use one of {usable}")

    out = Path(out)
    if components is None:
        components = _load_base(base, allow_pickle)
    device = _device()
    for key in ("unet", "vae", "text_encoder"):
        components[key].to(device)
    scheduler_config = dict(components["scheduler_config"] if "scheduler_config" in components
                            else components["scheduler"].config)

    leak_stats = None
    if start_from_leak is not None:
        from lora_offset.experiments.leak import LeakStatistics, folder_statistics

        leak_stats = start_from_leak if isinstance(start_from_leak, LeakStatistics) else folder_statistics(
            components["vae"], start_from_leak, resolution)
    names = _setting_names(specs)
    report = {"settings": {}, "config": {
        "base": str(base), "loras": [{"path": str(s.path), "weight": s.weight} for s in specs],
        "prompts": prompts, "n": n, "steps": steps, "seed": seed, "guidance_scale": guidance_scale,
        "resolution": resolution, "negative_prompt": negative_prompt, "clip_skip": clip_skip,
        "max_token_length": max_token_length, "sampler": sampler, "device": str(device),
        "luminance": "Rec. 709 (0.2126 R + 0.7152 G + 0.0722 B) on sRGB values in [0, 1]",
        "start_from_leak": None if leak_stats is None else {
            "source": str(start_from_leak) if not hasattr(start_from_leak, "mean") else "statistics",
            "fraction": leak_fraction, **leak_stats.to_dict()},
    }, "versions": _versions()}
    histograms: dict[str, dict[str, list[float]]] = {}
    seeds = [seed + i for i in range(n)]
    leaks = None
    if leak_stats is not None:
        from lora_offset.experiments.leak import draw_leaks

        leaks = draw_leaks(leak_stats, seeds, leak_fraction)

    for index, name in enumerate(names):
        if index == 0 and not include_base:
            continue
        spec = specs[index - 1] if index else None
        if spec is None:
            sampling = sampling_from_scheduler(scheduler_config)
        else:
            sampling = sampling_from_metadata(lora_files[index - 1][1])
        pipe = build_pipeline(components["unet"], components["vae"], components["text_encoder"],
                              components["tokenizer"], scheduler_config,
                              prediction_type=sampling.prediction_type, zero_terminal_snr=sampling.zero_terminal_snr,
                              sampler=sampler)
        adapter = f"eval_{index}"
        if spec is not None:
            _load_lora(pipe, spec, lora_files[index - 1][0], adapter)
        try:
            entry = {"lora": str(spec.path) if spec else None, "weight": spec.weight if spec else None,
                     "sampling": {"prediction_type": sampling.prediction_type,
                                  "zero_terminal_snr": sampling.zero_terminal_snr,
                                  "timestep_spacing": pipe.scheduler.config.timestep_spacing,
                                  "guidance_rescale": ZTSNR_GUIDANCE_RESCALE if sampling.zero_terminal_snr else 0.0},
                     "prompts": {}}
            histograms[name] = {}
            # The LoRA in the weights while sampling (as the web UIs apply it): twice as fast as PEFT's
            # unmerged layers; the base weights come back bit for bit.
            with merged_lora(pipe.unet, pipe.text_encoder):
                for p_index, prompt in enumerate(prompts):
                    if log is not None:
                        log(f"[{name}] {n} images of {prompt!r} ({sampling.prediction_type}"
                            f"{', zero terminal SNR' if sampling.zero_terminal_snr else ''})")
                    stats, decoded, images = measure_prompt(
                        pipe, prompt, seeds, steps=steps, guidance_scale=guidance_scale, height=resolution,
                        width=resolution, negative_prompt=negative_prompt, batch_size=batch_size, clip_skip=clip_skip,
                        max_token_length=max_token_length, leaks=leaks)
                    if on_decoded is not None:
                        on_decoded(name, prompt, decoded)
                    grid_name = f"grid_{name}_{p_index:02d}_{_slug(prompt)}.png"
                    grid = image_grid(to_pil(images))
                    atomic_write(out / grid_name, lambda tmp, g=grid: g.save(tmp, format="PNG"))
                    stats["grid"] = grid_name
                    entry["prompts"][prompt] = stats
                    histograms[name][prompt] = luminance_histogram(images)
            report["settings"][name] = entry
        finally:
            if spec is not None:
                pipe.unload_lora_weights()

    report["plot"] = PLOT_NAME
    write_histogram_plot(histograms, out / PLOT_NAME)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def measure_prompt(pipe, prompt: str, seeds: Sequence[int], *, steps: int, guidance_scale: float, height: int,
                   width: int, negative_prompt: str = "", batch_size: int = 4, clip_skip: int = 1,
                   max_token_length: int = 75, leaks=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """One image of `prompt` per seed from `pipe`, measured: (brightness_stats, the raw decodes (N, 3, H, W),
    the images (N, H, W, 3) in [0, 1]). What eval reports for a setting and prompt; the training's range
    monitor (lora_offset.training.monitor) measures with it too."""
    from lora_offset.experiments.sample import generate_decoded, to_unit_range

    decoded = generate_decoded(pipe, [prompt] * len(seeds), seeds, steps=steps, guidance_scale=guidance_scale,
                               height=height, width=width, negative_prompt=negative_prompt, batch_size=batch_size,
                               clip_skip=clip_skip, max_token_length=max_token_length, leaks=leaks).numpy()
    images = to_unit_range(decoded)
    stats = brightness_stats(images, unclamped=np.transpose(decoded, (0, 2, 3, 1)) / 2 + 0.5)
    return stats, decoded, images


def _load_lora(pipe, spec: LoraSpec, state_dict: dict, adapter: str) -> None:
    try:
        pipe.load_lora_weights(state_dict, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as e:
        pipe.unload_lora_weights()
        raise UserError(f"{spec.path}: not an SD 1.x LoRA that matches this base model "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    pipe.set_adapters([adapter], [spec.weight])


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="MODEL", help="base SD 1.x model: diffusers folder, hub id or single .safetensors file")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        type=FileAndNumber(WEIGHT, name="weight"),
                        help="a LoRA .safetensors file and its weight (default 1.0); repeat for several")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="repeat for several prompts")
    parser.add_argument("--negative-prompt", default="", metavar="TEXT")
    parser.add_argument("--n", type=Number(int, 1, 10000), default=16, help="images per setting and prompt (default 16)")
    parser.add_argument("--steps", type=Number(int, 1, 1000, why="SD 1.x has 1000 timesteps"), default=30,
                        help="sampling steps (default 30)")
    parser.add_argument("--sampler", default="ddim", metavar="NAME",
                        help="kohya's sampler names: ddim (default), euler, euler_a, dpm++_2m_karras, ...")
    parser.add_argument("--seed", type=Number(int, 0, SEED_MAX), default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--out", default="eval", metavar="DIR", type=OutputPath("folder"),
                        help="output folder (default ./eval)")
    parser.add_argument("--guidance", type=Number(float, 0, 50), default=7.5,
                        help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--resolution", type=Number(int, 8, 4096), default=512, help="image size in pixels (default 512)")
    parser.add_argument("--batch-size", type=Number(int, 1, 1024), default=4, help="images generated at once (default 4)")
    parser.add_argument("--clip-skip", type=Number(int, 1, 12, why="SD 1.x's text encoder has 12 layers"), default=1,
                        metavar="N",
                        help="encode prompts from CLIP's N-th layer from the end, as the LoRA was trained "
                             "(training.clip_skip; default 1 = the last layer)")
    parser.add_argument("--max-token-length", type=Number(int, 75, 225), default=75, choices=(75, 150, 225),
                        help="prompt tokens the text encoder sees, as the LoRA was trained (training.max_token_length; default 75)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading a pickle (.ckpt) base checkpoint (weights only)")
    parser.add_argument("--start-from-leak", metavar="DIR",
                        help="start sampling from the signal leak of these images' latent channel means "
                             "(Everaert et al. 2024): a training-free way to reach their brightness")
    parser.add_argument("--leak-fraction", type=Number(float, 0, 10), default=1.0,
                        help="scale of the leak's channel means (default 1.0; 0.5 = halfway)")


def run(args: argparse.Namespace) -> int:
    report = evaluate(args.base, [LoraSpec(path, weight) for path, weight in args.lora], args.prompt, n=args.n,
                      steps=args.steps, seed=args.seed, out=args.out, guidance_scale=args.guidance, resolution=args.resolution,
                      allow_pickle=args.allow_pickle, negative_prompt=args.negative_prompt, batch_size=args.batch_size,
                      clip_skip=args.clip_skip, start_from_leak=args.start_from_leak, leak_fraction=args.leak_fraction,
                      sampler=args.sampler, max_token_length=args.max_token_length,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    for name, entry in report["settings"].items():
        for prompt, s in entry["prompts"].items():
            print(f"{name:>20}  mean {s['mean_luminance']:.3f} ± {s['std_luminance']:.3f}  "
                  f"<0.05 {s['frac_below_0_05']:.3f}  >0.95 {s['frac_above_0_95']:.3f}  {prompt}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
