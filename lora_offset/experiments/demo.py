"""`lora-offset demo`: the solid-black experiment, offline, on a CPU, with the real train and eval code.

    lora-offset demo [--out DIR] [--quick]

1. Expand the shipped base model (lora_offset/assets/demo_base.safetensors, made by
   scripts/train_demo_base.py; see lora_offset/experiments/demo_base.py) into DIR/base-model.
2. Check the mechanism on the base model: its samples for "a photo" against the brightness of its
   training data, and with the starting noise's per-channel mean shifted to what a solid black /
   solid white image leaves in x_T.
3. Write a DreamBooth set: solid black instance images ("a photo of sks") and class images of
   widely varying brightness ("a photo", prior preservation).
4. Train the same LoRA budget three times with lora_offset.training.train: standard noise, offset noise
   0.1, zero terminal SNR with v-prediction.
5. Evaluate base + the three LoRAs with lora_offset.experiments.evaluate; write DIR/report.md and
   DIR/report.json.

The protocol (steps, seeds, learning rate, prompts, sampler) is fixed in PROTOCOL below and was
fixed before the results were seen; `--quick` only shrinks it to check that the pipeline runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from lora_offset.errors import UserError
from lora_offset.fileio import atomic_write_text

INSTANCE_PROMPT = "a photo of sks"
CLASS_PROMPT = "a photo"

# The full run, fixed before its results were seen. History (docs/DEMO-NOTES.md): v1 (lr 5e-4,
# attention-only LoRA) learned nothing in any condition (every epsilon LoRA stayed within 0.01 of
# the base model on both prompts); v2 raises the learning rate and adds conv LoRA for all three.
PROTOCOL = {
    "version": 2,
    "instance_images": 8,       # identical solid black 128x128 images
    "class_images": 64,         # make_dataset.varied_image, dark to bright
    "class_seed": 12345,        # disjoint from the base model's training images (seeds 1, 2)
    "rank": 8,
    "alpha": 8.0,
    "conv_rank": 8,             # kohya LoCon: ResNet 3x3 convs too
    "conv_alpha": 8.0,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 10,
    "max_steps": 200,
    "batch_size": 4,            # 4 instance + 4 class images per step
    "prior_loss_weight": 1.0,
    "train_seed": 0,
    "eval_n": 16,
    "eval_steps": 25,
    "eval_seed": 1000,
    "guidance_scale": 7.5,
    "base_check_n": 32,
}
QUICK = {**PROTOCOL, "instance_images": 2, "class_images": 4, "max_steps": 2, "lr_warmup_steps": 0,
         "eval_n": 2, "eval_steps": 2, "base_check_n": 2}

# name -> (noise/model settings). Same LoRA budget for all three.
CONDITIONS = {
    "standard": {"noise": {"offset": 0.0}, "prediction_type": "epsilon"},
    "offset": {"noise": {"offset": 0.1}, "prediction_type": "epsilon"},
    "ztsnr": {"noise": {"offset": 0.0, "zero_terminal_snr": True}, "prediction_type": "v_prediction"},
}
GOAL_OFFSET_MAX, GOAL_STANDARD_MIN = 0.10, 0.30
RESOLUTION = 128  # lora_offset.experiments.demo_base.IMAGE_SIZE

log = logging.getLogger("lora_offset")


# ---------------------------------------------------------------------------------------------
# Pieces


def write_dataset(folder: Path, protocol: dict) -> tuple[Path, Path]:
    """Instance (solid black) and class (varied) image folders; captions come from class_tokens."""
    from lora_offset.experiments.make_dataset import make_solid, make_varied

    instance, cls = folder / "instance", folder / "class"
    make_solid("black", protocol["instance_images"], RESOLUTION, instance)
    make_varied(protocol["class_images"], RESOLUTION, cls, seed=protocol["class_seed"])
    return instance, cls


def train_config(name: str, base_dir: Path, instance: Path, cls: Path, out: Path, protocol: dict) -> dict:
    """The `lora-offset train` config (as a dict) of one condition; written next to its adapter too."""
    cond = CONDITIONS[name]
    return {
        "model": {"pretrained": str(base_dir), "prediction_type": cond["prediction_type"]},
        "network": {"rank": protocol["rank"], "alpha": protocol["alpha"], "conv_rank": protocol["conv_rank"],
                    "conv_alpha": protocol["conv_alpha"]},
        "noise": dict(cond["noise"]),
        "training": {
            "output_dir": str(out / name), "output_name": f"black-{name}",
            "max_steps": protocol["max_steps"], "learning_rate": protocol["learning_rate"],
            "lr_warmup_steps": protocol["lr_warmup_steps"], "lr_scheduler": "constant_with_warmup",
            "mixed_precision": "no", "optimizer": "adamw", "gradient_checkpointing": False,
            "seed": protocol["train_seed"], "prior_loss_weight": protocol["prior_loss_weight"],
            "save_precision": "fp32",
        },
        "dataset": {
            "resolution": RESOLUTION, "batch_size": protocol["batch_size"],
            "subsets": [
                {"image_dir": str(instance), "class_tokens": INSTANCE_PROMPT},
                {"image_dir": str(cls), "class_tokens": CLASS_PROMPT, "is_reg": True},
            ],
        },
    }


def image_luminance(decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-image mean luminance of the clamped images, same unclamped) from raw decodes (N, 3, H, W) in [-1, 1]."""
    from lora_offset.experiments.evaluate import luminance

    x = np.transpose(np.asarray(decoded, dtype=np.float64), (0, 2, 3, 1)) / 2 + 0.5
    return luminance(np.clip(x, 0, 1)).mean(axis=(1, 2)), luminance(x).mean(axis=(1, 2))


def data_brightness(n: int = 256, seed: int = 2) -> dict:
    """Brightness of the base model's training distribution (make_dataset.varied_array)."""
    from lora_offset.experiments.make_dataset import varied_array

    rng = np.random.default_rng(seed)
    arr = np.stack([varied_array(rng, RESOLUTION) for _ in range(n)])
    from lora_offset.experiments.evaluate import luminance

    means = luminance(arr).mean(axis=(1, 2))
    return _spread(means)


def _spread(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean_luminance": float(v.mean()), "std_luminance": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "n": int(v.size)}


def latent_channel_means(vae, color: str) -> "torch.Tensor":
    """Per-channel spatial mean of the scaled latent of a solid image (what it leaves in x_T, times sqrt(abar_T))."""
    import torch

    from lora_offset.experiments.make_dataset import solid_image

    px = torch.from_numpy(np.asarray(solid_image(color, RESOLUTION), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    with torch.no_grad():
        z = vae.encode(px[None].to(vae.device)).latent_dist.mean * vae.config.scaling_factor
    return z.mean(dim=(2, 3))[0].cpu()


def base_noise_check(components: dict, n: int, steps: int, seed: int, guidance: float) -> dict:
    """The base model's "a photo" samples from x_T ~ N(0, I) and from x_T shifted toward black / white.

    The shift is sqrt(abar_T) times the per-channel latent mean of a solid black (white) image: the
    channel means that image leaves in x_T at the last training timestep.
    """
    import torch
    from diffusers import DDPMScheduler

    from lora_offset.experiments.sample import build_pipeline, eval_mode

    sched_cfg = dict(components["scheduler"].config)
    abar_T = float(DDPMScheduler.from_config(sched_cfg).alphas_cumprod[-1])
    vae = components["vae"]
    pipe = build_pipeline(components["unet"], vae, components["text_encoder"], components["tokenizer"], sched_cfg)
    lat = RESOLUTION // 8
    result = {"sqrt_alpha_bar_T": math.sqrt(abar_T), "latent_pixels_per_channel": lat * lat,
              "noise_mean_std": 1 / lat, "shifts": {}}
    for target in ("none", "black", "white"):
        shift = torch.zeros(4) if target == "none" else math.sqrt(abar_T) * latent_channel_means(vae, target)
        decoded = []
        with eval_mode(pipe.unet, pipe.text_encoder, vae), torch.no_grad():
            for start in range(0, n, 8):
                seeds = range(seed + start, seed + min(n, start + 8))
                x_T = torch.stack([torch.randn((4, lat, lat), generator=torch.Generator().manual_seed(s)) for s in seeds])
                x_T = x_T + shift.view(1, 4, 1, 1)
                z = pipe(prompt=[CLASS_PROMPT] * len(x_T), negative_prompt=[""] * len(x_T), height=RESOLUTION,
                         width=RESOLUTION, num_inference_steps=steps, guidance_scale=guidance, latents=x_T,
                         output_type="latent").images
                decoded.append(vae.decode(z / vae.config.scaling_factor).sample.float().cpu().numpy())
        clamped, unclamped = image_luminance(np.concatenate(decoded))
        entry = _spread(clamped)
        entry["mean_luminance_unclamped"] = float(unclamped.mean())
        entry["x_T_channel_shift"] = [round(float(v), 4) for v in shift]
        result["shifts"][target] = entry
    return result


# ---------------------------------------------------------------------------------------------
# The run


def run_demo(out: Path, quick: bool = False, weights: Path | None = None) -> dict:
    from lora_offset.experiments import demo_base
    from lora_offset.config import Config
    from lora_offset.experiments.evaluate import evaluate
    from lora_offset.training.train import train

    protocol = QUICK if quick else PROTOCOL
    weights = Path(weights) if weights else demo_base.ASSETS_DIR / demo_base.WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"the demo's base model {weights} is missing: reinstall lora-offset, or make it with "
                        "`python scripts/train_demo_base.py`")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    t0 = time.perf_counter()
    base_dir = demo_base.expand_to_diffusers(out / "base-model", weights)
    instance, cls = write_dataset(out / "data", protocol)
    timings["setup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    components = demo_base.load_components(weights, tokenizer_dir=out / "base-model" / "tokenizer")
    base_check = base_noise_check(components, protocol["base_check_n"], protocol["eval_steps"],
                                  protocol["eval_seed"], protocol["guidance_scale"])
    training_data = data_brightness(n=64 if quick else 256)
    timings["base_check"] = time.perf_counter() - t0

    adapters = {}
    for name in CONDITIONS:
        t0 = time.perf_counter()
        cfg = train_config(name, base_dir, instance, cls, out / "loras", protocol)
        atomic_write_text(out / "loras" / f"{name}.json", json.dumps(cfg, indent=2) + "\n")
        log.info("demo: training the %s LoRA (%d steps)", name, protocol["max_steps"])
        adapters[name] = train(Config.from_dict(cfg, source=f"demo:{name}"))
        timings[f"train_{name}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eval_report = evaluate(
        str(base_dir), [(adapters[name], 1.0) for name in CONDITIONS], prompts=[INSTANCE_PROMPT, CLASS_PROMPT],
        n=protocol["eval_n"], steps=protocol["eval_steps"], seed=protocol["eval_seed"], out=out / "eval",
        guidance_scale=protocol["guidance_scale"], resolution=RESOLUTION, components=components,
    )
    timings["eval"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    report = build_report(eval_report, base_check, training_data, protocol, quick, timings, adapters)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(report))
    return report


def build_report(eval_report: dict, base_check: dict, training_data: dict, protocol: dict, quick: bool,
                 timings: dict, adapters: dict) -> dict:
    settings = eval_report["settings"]
    names = list(settings)  # "base", then one per LoRA in CONDITIONS order
    keys = ("mean_luminance", "std_luminance", "mean_luminance_unclamped", "frac_below_0_05", "grid")

    def pick(stats: dict) -> dict:
        return {k: stats[k] for k in keys if k in stats}

    conditions = {}
    for cond_name, setting in zip(CONDITIONS, names[1:]):
        prompts = settings[setting]["prompts"]
        conditions[cond_name] = {**pick(prompts[INSTANCE_PROMPT]), "class_prompt": pick(prompts[CLASS_PROMPT]),
                                 "adapter": str(adapters[cond_name]), "sampling": settings[setting]["sampling"],
                                 **CONDITIONS[cond_name]}
    base_prompts = settings[names[0]]["prompts"]
    standard, offset = conditions["standard"]["mean_luminance"], conditions["offset"]["mean_luminance"]
    goal_met = offset <= GOAL_OFFSET_MAX and standard >= GOAL_STANDARD_MIN
    return {
        "quick": quick,
        "instance_prompt": INSTANCE_PROMPT,
        "class_prompt": CLASS_PROMPT,
        "conditions": conditions,
        "base": {**pick(base_prompts[CLASS_PROMPT]), "instance_prompt": pick(base_prompts[INSTANCE_PROMPT]),
                 "noise_check": base_check},
        "base_training_data": training_data,
        "goal": {"offset_max": GOAL_OFFSET_MAX, "standard_min": GOAL_STANDARD_MIN, "met": goal_met,
                 "gap_standard_minus_offset": standard - offset},
        "protocol": protocol,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "eval": {"report": "eval/report.md", "histograms": "eval/" + eval_report["plot"],
                 "config": eval_report["config"]},
    }


def render_report(r: dict) -> str:
    p, c, b, d = r["protocol"], r["conditions"], r["base"], r["base_training_data"]
    nc = b["noise_check"]
    sh = nc["shifts"]

    def ms(s: dict) -> str:
        return f"{s['mean_luminance']:.3f} ± {s['std_luminance']:.3f}"

    lines = ["# lora-offset demo: the solid-black experiment", ""]
    if r["quick"]:
        lines += ["**--quick run: a pipeline check with a handful of steps and images; the numbers below mean "
                  "nothing about offset noise.**", ""]
    lines += [
        f"Three LoRAs with the same budget (rank {p['rank']}, alpha {p['alpha']:g}, conv rank {p['conv_rank']}, "
        f"conv alpha {p['conv_alpha']:g}, {p['max_steps']} steps, "
        f"lr {p['learning_rate']:g}, batch {p['batch_size']} instance + {p['batch_size']} class images, "
        f"prior loss weight {p['prior_loss_weight']:g}) on {p['instance_images']} solid black images captioned "
        f"\"{r['instance_prompt']}\", with {p['class_images']} class images of varied brightness (\"{r['class_prompt']}\"). "
        f"Evaluation: {p['eval_n']} images per prompt (seeds {p['eval_seed']}..{p['eval_seed'] + p['eval_n'] - 1}, "
        f"the same starting noise for every condition), {p['eval_steps']} DDIM steps, guidance {p['guidance_scale']:g}. "
        "Mean luminance (Rec. 709) of each image, then mean ± spread (std) across images; 0 is black.",
        "",
        f"| condition | \"{r['instance_prompt']}\" (target: black) | unclamped | pixels < 0.05 | \"{r['class_prompt']}\" (should stay varied) |",
        "|---|---|---|---|---|",
        f"| base model, no LoRA | {ms(b['instance_prompt'])} | {b['instance_prompt']['mean_luminance_unclamped']:.3f} | "
        f"{b['instance_prompt']['frac_below_0_05']:.3f} | {ms(b)} |",
    ]
    labels = {"standard": "standard noise", "offset": "offset noise 0.1",
              "ztsnr": "zero terminal SNR + v-prediction"}
    for name, s in c.items():
        lines.append(f"| {labels.get(name, name)} | **{ms(s)}** | {s['mean_luminance_unclamped']:.3f} | "
                     f"{s['frac_below_0_05']:.3f} | {ms(s['class_prompt'])} |")
    g = r["goal"]
    verdict = "met" if g["met"] else "NOT met"
    lines += [
        "",
        f"Goal (offset noise ≤ {g['offset_max']:.2f} while standard noise stays ≥ {g['standard_min']:.2f}): **{verdict}**. "
        f"Standard {c['standard']['mean_luminance']:.3f}, offset {c['offset']['mean_luminance']:.3f} "
        f"(gap {g['gap_standard_minus_offset']:+.3f}), zero terminal SNR {c['ztsnr']['mean_luminance']:.3f}.",
        "" if g["met"] else (f"At this scale (16×16 latents, {p['max_steps']} LoRA steps) offset noise did not reach "
                             "the goal; docs/DEMO-NOTES.md records what was tried."),
        "",
        "## The mechanism, measured on the base model",
        "",
        f"- Training data (make_dataset varied images): {ms(d)} (range {d['min']:.2f}–{d['max']:.2f}).",
        f"- Base model, \"{r['class_prompt']}\", x_T ~ N(0, I): {ms(sh['none'])} over {sh['none']['n']} images "
        f"(range {sh['none']['min']:.2f}–{sh['none']['max']:.2f}).",
        f"- Same seeds, x_T's channel means shifted to what a solid black image leaves at t = T "
        f"(√ᾱ_T = {nc['sqrt_alpha_bar_T']:.3f} times its latent mean): {ms(sh['black'])}; toward white: {ms(sh['white'])}.",
        f"- Latent {int(math.isqrt(nc['latent_pixels_per_channel']))}×{int(math.isqrt(nc['latent_pixels_per_channel']))}: "
        f"the starting noise's per-channel mean has std 1/√{nc['latent_pixels_per_channel']} = {nc['noise_mean_std']:.4f} "
        f"(SD 1.5 at 512²: 1/√4096 = 0.0156). The black shift above is {_shift_norm(sh['black']):.3f} per channel (rms).",
        "",
        "## Images",
        "",
    ]
    for name, s in [("base", b["instance_prompt"])] + list(c.items()):
        lines.append(f"- {labels.get(name, name)}: \"{r['instance_prompt']}\" ![{name}](eval/{s['grid']}) · "
                     f"\"{r['class_prompt']}\" [grid](eval/{(b if name == 'base' else s['class_prompt'])['grid']})")
    lines += ["", f"![luminance histograms]({r['eval']['histograms']})", "",
              "Full per-setting statistics: [eval/report.md](eval/report.md).", "",
              "Time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items()), ""]
    return "\n".join(lines)


def _shift_norm(entry: dict) -> float:
    v = np.asarray(entry["x_T_channel_shift"], dtype=np.float64)
    return float(np.sqrt((v ** 2).mean()))


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (default ./demo-output)")
    parser.add_argument("--quick", action="store_true", help="a fast pipeline check (under 2 minutes): tiny steps, "
                        "no meaningful numbers")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest for these small models on a shared CPU)")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "report.json").exists() and not (out / "base-model").exists():
        raise UserError(f"--out {out} exists and holds other files; give a new or empty folder")
    report = run_demo(out, quick=args.quick)
    c = report["conditions"]
    print(f"wrote {out / 'report.md'}")
    for name, s in c.items():
        print(f"  {name:9s} \"{INSTANCE_PROMPT}\": mean luminance {s['mean_luminance']:.3f} ± {s['std_luminance']:.3f}")
    print(f"  goal (offset <= {GOAL_OFFSET_MAX}, standard >= {GOAL_STANDARD_MIN}): "
          f"{'met' if report['goal']['met'] else 'not met'}")
    return 0
