"""The demo's jobs: one function per unit of work, each reading and writing files in the demo folder.

`lora-offset demo` (lora_offset/experiments/demo.py) runs them two at a time, each in a process
forked for it (lora_offset/experiments/demo_runner.py); `python -m lora_offset.experiments.demo_jobs
JOB OUT [ARM]` runs one by hand. Each job writes one JSON file that the report reads:

    gates OUT         base-model checks (a)-(c), SD 1.5 match, the base's own evaluation   -> gates.json
    train OUT ARM     one LoRA through lora_offset.training.train (the real trainer)        -> loras/ARM/...
    eval OUT ARM      one LoRA through lora_offset.experiments.evaluate, plain and leak starts,
                      and its first-step response                                          -> eval/ARM/result.json

The protocol (demo.protocol.json, written by demo.py before any job runs) fixes every number.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lora_offset.fileio import atomic_write_text

PROTOCOL_FILE = "protocol.json"
# The control's instance (v5): a solid mid-grey picture, the class's brightness (so x_T's channel
# mean does not stand in its way), whose identity is that it is flat: no shape, no pattern.
CONTROL_GREY = "#808080"


def read_protocol(out: Path) -> dict:
    return json.loads((out / PROTOCOL_FILE).read_text(encoding="utf-8"))


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def load_base(out: Path) -> dict:
    """The expanded base model as evaluate() components (fp32, CPU, frozen)."""
    from lora_offset.config import ModelConfig
    from lora_offset.training.models import load_base_model

    base = load_base_model(ModelConfig(pretrained=str(out / "base-model")))
    return {**base.components(), "scheduler_config": dict(base.scheduler_config)}


def pipeline(components: dict):
    from lora_offset.experiments.sample import build_pipeline

    return build_pipeline(components["unet"], components["vae"], components["text_encoder"],
                          components["tokenizer"], components["scheduler_config"])


def luminance_of(decoded: torch.Tensor) -> np.ndarray:
    """Per-image mean Rec. 709 luminance of raw decodes (N, 3, H, W) in [-1, 1], clamped to [0, 1]."""
    return luminance_of_pixels(decoded).mean(axis=(1, 2))


def luminance_of_pixels(decoded: torch.Tensor) -> np.ndarray:
    """(N, H, W) Rec. 709 luminance of raw decodes (N, 3, H, W) in [-1, 1], clamped to [0, 1]."""
    from lora_offset.experiments.brightness_report import luminance
    from lora_offset.experiments.sample import to_unit_range

    return luminance(to_unit_range(decoded))


def circles_of(hue: str, p: dict) -> np.ndarray:
    """The world's pictures that "a photo of a {hue} circle" describes (other attributes drawn at random)."""
    import dataclasses

    from lora_offset.experiments import demo_world

    rng = np.random.default_rng(p["data_seed"] + 2)
    attrs = [dataclasses.replace(demo_world.draw_attributes(rng), colour=hue, shape="circle")
             for _ in range(p["gate_pictures"])]
    return np.stack([demo_world.render(a, p["resolution"]) for a in attrs]).astype(np.float32)


def sample(pipe, prompt: str, p: dict, leaks: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
    from lora_offset.experiments.sample import generate_decoded

    n = n or p["eval_n"]
    seeds = [p["eval_seed"] + i for i in range(n)]
    size = p["resolution"]
    return generate_decoded(pipe, [prompt] * n, seeds, steps=p["eval_steps"], guidance_scale=p["guidance_scale"],
                            height=size, width=size, batch_size=p["sample_batch"], leaks=leaks)


def instance_leak(components: dict, p: dict, color: str) -> torch.Tensor:
    """(C,) scaled latent channel mean of a solid image of `color` at the demo's resolution."""
    from lora_offset.experiments.leak import channel_statistics
    from lora_offset.experiments.make_dataset import solid_image
    from lora_offset.training.data.images import to_tensor

    vae = components["vae"]
    px = to_tensor(solid_image(color, p["resolution"]))[None]
    with torch.no_grad():
        z = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
    return channel_statistics(z).mean


def within_image_spread(luminance: np.ndarray) -> np.ndarray:
    """Per-image standard deviation of (N, H, W) luminance: 0 for a flat picture, whatever its
    brightness and wherever its structure lies (a phase-free measure of "flat")."""
    return np.asarray(luminance, dtype=np.float64).std(axis=(1, 2))


@torch.no_grad()
def control_template(components: dict, p: dict) -> dict:
    """The control's instance (solid mid-grey) as the base's VAE shows it (encode, decode): its mean
    luminance and within-image spread, the flattest the samples can get."""
    from lora_offset.experiments.demo_base import reconstruct
    from lora_offset.experiments.make_dataset import solid_image

    drawn = np.asarray(solid_image(CONTROL_GREY, p["resolution"]), dtype=np.float32)[None] / 255.0
    rec = luminance_of_pixels(reconstruct(components["vae"], drawn))
    return {"mean_luminance": float(rec.mean()), "spread": float(within_image_spread(rec)[0])}


def control_check(decoded: torch.Tensor, components: dict, p: dict) -> dict:
    """The instance prompt's samples (raw decodes at the eval seeds) against the control's template."""
    template = control_template(components, p)
    lum = luminance_of_pixels(decoded)
    return {"spread": float(within_image_spread(lum).mean()), "mean_luminance": float(lum.mean()),
            "template_mean_luminance": template["mean_luminance"], "template_spread": template["spread"]}


# ---------------------------------------------------------------------------------------------
# First-step response: what the model predicts at the first sampling step from a leak of given size


@torch.no_grad()
def first_step_response(pipe, prompt: str, p: dict, direction: torch.Tensor, fractions) -> list[dict]:
    """For each fraction f: start x_T from the leak f * direction (lora_offset.experiments.leak) and
    take the first sampling step's prediction of x0 (classifier-free guidance as in sampling).
    Returns per f: mean luminance of the decoded x0 prediction and its channel mean along `direction`."""
    from lora_offset.experiments.leak import first_step_alpha_bar, leak_start
    from lora_offset.experiments.sample import eval_mode, merged_lora

    n, size = p["eval_n"], p["resolution"]
    latent = size // pipe.vae_scale_factor
    seeds = [p["eval_seed"] + i for i in range(n)]
    noise = torch.stack([torch.randn((4, latent, latent), generator=torch.Generator().manual_seed(s)) for s in seeds])
    scheduler = pipe.scheduler
    alpha_bar = first_step_alpha_bar(scheduler, p["eval_steps"])
    t = scheduler.timesteps[0]
    unit = direction / direction.norm()
    with eval_mode(pipe.unet, pipe.text_encoder, pipe.vae), merged_lora(pipe.unet, pipe.text_encoder):
        cond, uncond = pipe.encode_prompt(prompt, "cpu", n, True, negative_prompt="")
        rows = []
        for f in fractions:
            x = leak_start(noise, (f * direction).expand(n, -1), alpha_bar)
            eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
            eps = eps_u + p["guidance_scale"] * (eps_c - eps_u)
            x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
            decoded = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
            rows.append({"fraction": float(f), "x0_luminance": float(luminance_of(decoded).mean()),
                         "x0_channel_mean_along_leak": float((x0.mean(dim=(2, 3)) @ unit).mean())})
    return rows


# ---------------------------------------------------------------------------------------------
# Jobs


def job_gates(out: Path) -> dict:
    """Gates (a)-(c) on the base model, the SD 1.5 match, and the base's evaluation (same seeds as the arms)."""
    from lora_offset.experiments import demo_world
    from lora_offset.experiments.evaluate import evaluate
    from lora_offset.experiments.leak import first_step_alpha_bar, z_score

    p = read_protocol(out)
    c = load_base(out)
    pipe = pipeline(c)
    n = p["eval_n"]
    lum = lambda decoded: luminance_of(decoded)  # noqa: E731
    result: dict = {"gates": {}}

    # The base model's own evaluation, at the arms' seeds, prompts and sampler. Its images of the
    # instance and class prompts are the ones gates (a) and (c) need (the same pipeline, seeds and
    # settings as `sample`): kept, not generated again.
    common = dict(n=n, steps=p["eval_steps"], seed=p["eval_seed"], guidance_scale=p["guidance_scale"],
                  resolution=p["resolution"], batch_size=p["sample_batch"], components=c)
    prompts = [p["instance_prompt"], p["class_prompt"]]
    base_images: dict[str, torch.Tensor] = {}
    result["eval"] = {"plain": evaluate(
        str(out / "base-model"), [], prompts, out=out / "eval" / "base" / "plain",
        on_decoded=lambda setting, prompt, decoded: base_images.__setitem__(prompt, torch.from_numpy(decoded)),
        **common)}
    inst, cls = base_images[p["instance_prompt"]], base_images[p["class_prompt"]]

    # (a) brightness follows x_T's channel mean: full leaks of solid black / white.
    plain = lum(cls)
    shifted = {color: lum(sample(pipe, p["class_prompt"], p, leaks=instance_leak(c, p, color).expand(n, -1)))
               for color in ("black", "white")}
    g = p["gates"]["a_min_shift"]
    result["gates"]["a_follows_x_T_mean"] = {
        "value": {"plain": float(plain.mean()), "black_leak": float(shifted["black"].mean()),
                  "white_leak": float(shifted["white"].mean())},
        "pass": bool(shifted["black"].mean() <= plain.mean() - g and shifted["white"].mean() >= plain.mean() + g),
        "rule": f"black-leak start <= plain - {g} and white-leak start >= plain + {g} (\"{p['class_prompt']}\")",
    }
    # (b) the Guttenberg symptom: the extreme words cannot reach their own training data's brightness.
    g = p["gates"]["b_min_gap"]
    symptom, pictures = {}, {}
    for word in ("very dark", "very bright"):
        images, _ = demo_world.draw_dataset(p["gate_pictures"], seed=p["data_seed"], brightness=word)
        pictures[word] = images
        symptom[word] = {"data": float(demo_world.mean_luminance(images).mean()),
                         "samples": float(lum(sample(pipe, f"a {word} photo", p)).mean())}
    result["gates"]["b_guttenberg_symptom"] = {
        "value": symptom,
        "pass": bool(symptom["very dark"]["samples"] >= symptom["very dark"]["data"] + g
                     and symptom["very bright"]["samples"] <= symptom["very bright"]["data"] - g),
        "rule": f"\"a very dark photo\" samples >= its training images + {g}, \"a very bright photo\" <= - {g}",
    }
    # (c) the text works: one word changes the images; the rare token is not the class prompt.
    redness = lambda d: (d[:, 0] - d[:, 2]).mean(dim=(1, 2)).numpy() / 2  # noqa: E731  (R - B in [0, 1] units)
    red, blue = (sample(pipe, f"a photo of a {hue} circle", p) for hue in ("red", "blue"))
    colour_gap = float((redness(red) - redness(blue)).mean())
    from lora_offset.experiments.demo_base import reconstruct

    shown = {hue: reconstruct(c["vae"], circles_of(hue, p)) for hue in ("red", "blue")}
    reachable_gap = float(redness(shown["red"]).mean() - redness(shown["blue"]).mean())
    token_gap = float(((inst - cls).abs() / 2).mean())
    share = p["gates"]["c_min_colour_share"]
    result["gates"]["c_text_works"] = {
        "value": {"red_minus_blue_redness": colour_gap, "pictures_through_the_vae": reachable_gap,
                  "instance_vs_class_pixel_difference": token_gap},
        "pass": bool(colour_gap >= share * reachable_gap and token_gap >= p["gates"]["c_min_token_gap"]),
        "rule": (f"same seeds: R - B (0-1 units) of \"a photo of a red circle\" minus \"... blue circle\" >= {share} x the same "
                 "gap of such pictures (encoded and decoded by the VAE); mean |pixel difference| of "
                 f"\"{p['instance_prompt']}\" vs \"{p['class_prompt']}\" >= {p['gates']['c_min_token_gap']}"),
    }
    # The positive control's reference: how uneven the base's instance-prompt samples are.
    template = control_template(c, p)
    result["control_reference"] = {"base_spread": float(within_image_spread(luminance_of_pixels(inst)).mean()),
                                   "template_spread": template["spread"],
                                   "template_mean_luminance": template["mean_luminance"]}

    # SD 1.5 match: z of the darkest training images' leak at the first sampling step.
    from lora_offset.experiments.demo_base import to_model_range

    vae = c["vae"]
    with torch.no_grad():
        dark = (vae.encode(to_model_range(pictures["very dark"])).latent_dist.mean * vae.config.scaling_factor).mean(dim=(0, 2, 3))
    alpha_bar = first_step_alpha_bar(pipe.scheduler, p["eval_steps"])
    pixels = (p["resolution"] // 8) ** 2
    black = instance_leak(c, p, "black")
    result["sd15_match"] = {
        "first_sampling_step_sqrt_alpha_bar": alpha_bar**0.5,
        "latent_pixels_per_channel": pixels,
        "darkest_data_channel_mean": [round(float(v), 4) for v in dark],
        "solid_black_channel_mean": [round(float(v), 4) for v in black],
        "z_standard": max(z_score(alpha_bar, float(m), pixels) for m in dark),
        "z_offset": max(z_score(alpha_bar, float(m), pixels, p["offset"]) for m in dark),
        "z_standard_solid_black": max(z_score(alpha_bar, float(m), pixels) for m in black),
        "z_offset_solid_black": max(z_score(alpha_bar, float(m), pixels, p["offset"]) for m in black),
        "offset": p["offset"],
        "sd15": {"sqrt_alpha_bar": 0.076, "channel_mean": 1.2, "latent_pixels": 4096, "offset": 0.1,
                 "z_standard": z_score(0.076**2, 1.2, 4096), "z_offset": z_score(0.076**2, 1.2, 4096, 0.1)},
    }

    result["eval"]["leak"] = {
        str(f): evaluate(str(out / "base-model"), [], [p["instance_prompt"]], out=out / "eval" / "base" / f"leak-{f:g}",
                         start_from_leak=out / "data" / "black", leak_fraction=f, **common)
        for f in p["leak_fractions"]}
    result["first_step"] = first_step_response(pipeline(c), p["instance_prompt"], p, black, p["response_fractions"])
    write_json(out / "gates.json", result)
    return result


def job_classes(out: Path) -> Path:
    """The base model's own images of the class prompt, as DreamBooth's prior preservation uses."""
    from lora_offset.experiments.make_dataset import write_images
    from lora_offset.experiments.sample import generate

    p = read_protocol(out)
    seeds = [p["class_seed"] + i for i in range(p["class_images"])]
    size = p["resolution"]
    images = generate(pipeline(load_base(out)), [p["class_prompt"]] * len(seeds), seeds, steps=p["eval_steps"],
                      guidance_scale=p["guidance_scale"], height=size, width=size, batch_size=p["sample_batch"])
    write_images(images, out / "data" / "class")
    return out / "data" / "class"


class _LossLog:
    def __init__(self):
        self.losses: list[float] = []

    def on_step_start(self, step):
        pass

    def on_step_end(self, step, loss):
        self.losses.append(float(loss))


def job_train(out: Path, arm: str) -> dict:
    """One arm's LoRA with the real trainer; its loss per step goes to loras/ARM/losses.json."""
    from lora_offset.config import load_config
    from lora_offset.training.train import train

    config_path = out / "loras" / f"{arm}.toml"
    losses = _LossLog()
    t0 = time.perf_counter()
    adapter = train(load_config(config_path), hooks=losses)
    result = {"adapter": str(adapter), "losses": losses.losses, "seconds": time.perf_counter() - t0}
    write_json(out / "loras" / arm / "losses.json", result)
    return result


def job_eval(out: Path, arm: str) -> dict:
    """One arm's LoRA: its prompts from plain noise and from the instance's leak (full, half), and its
    first-step response, at the base's seeds."""
    from lora_offset.experiments.evaluate import evaluate
    from lora_offset.experiments.leak import channel_statistics

    p = read_protocol(out)
    arm_cfg = p["arms"][arm]
    c = load_base(out)
    adapter = json.loads((out / "loras" / arm / "losses.json").read_text())["adapter"]
    folder = out / "eval" / arm
    common = dict(n=p["eval_n"], steps=p["eval_steps"], seed=p["eval_seed"], guidance_scale=p["guidance_scale"],
                  resolution=p["resolution"], batch_size=p["sample_batch"], components=c, include_base=False)
    images: dict[str, torch.Tensor] = {}
    result = {"adapter": adapter, "plain": evaluate(
        str(out / "base-model"), [adapter], arm_cfg["prompts"], out=folder / "plain",
        on_decoded=lambda setting, prompt, decoded: images.__setitem__(prompt, torch.from_numpy(decoded)), **common)}
    instance_dir = out / "data" / arm_cfg["instance"]
    if arm_cfg["instance"] == "grey":  # the positive control: are its samples as flat as its instance?
        result["control_check"] = control_check(images[p["instance_prompt"]], c, p)
    if arm_cfg.get("diagnostics"):
        result["leak"] = {
            str(f): evaluate(str(out / "base-model"), [adapter], [p["instance_prompt"]], out=folder / f"leak-{f:g}",
                             start_from_leak=instance_dir, leak_fraction=f, **common)
            for f in p["leak_fractions"]}
        from lora_offset.experiments.leak import encode_folder

        direction = channel_statistics(encode_folder(c["vae"], instance_dir, p["resolution"])).mean
        pipe = pipeline(c)
        pipe.load_lora_weights(adapter, adapter_name="arm")
        result["first_step"] = first_step_response(pipe, p["instance_prompt"], p, direction, p["response_fractions"])
    write_json(folder / "result.json", result)
    return result


JOBS = {"classes": job_classes, "gates": job_gates, "train": job_train, "eval": job_eval}


def run_logged(out: str, args: list[str], logfile: str) -> None:
    """One job in a process forked for it (lora_offset/experiments/demo_runner.py): its output into
    `logfile`, a failure as a traceback there and exit status 1."""
    import os
    import traceback

    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        main([args[0], out, *args[1:]])
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1)
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    # The job's own CPU time (a forked process counts from zero): a load-independent stage cost.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    atomic_write_text(Path(logfile).with_suffix(".cpu"), f"{usage.ru_utime + usage.ru_stime:.2f}\n")


def cpu_seconds(logfile: Path) -> float | None:
    """The CPU seconds a job run by run_logged used (None for a job run some other way)."""
    path = Path(logfile).with_suffix(".cpu")
    return float(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, out, *rest = argv
    from lora_offset.quiet import disable_library_progress_bars

    disable_library_progress_bars()
    torch.set_num_threads(1)
    JOBS[name](Path(out), *rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
