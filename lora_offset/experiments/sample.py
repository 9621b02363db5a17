"""Image generation shared by the trainer (sample images, class images) and `lora-offset eval`.

Sampling must match how a model was trained: a zero-terminal-SNR / v-prediction LoRA needs the
rescaled schedule, trailing timesteps (so the first step starts at t = T, where the signal is
exactly zero) and guidance rescale; an epsilon LoRA on SD's standard schedule needs none of that.
`build_pipeline` makes that choice once; `generate` is deterministic per seed (one
torch.Generator per image), so the same seed gives the same starting noise in every setting.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lora_offset.fileio import atomic_write

ZTSNR_GUIDANCE_RESCALE = 0.7  # Lin et al. 2023, section 3.4


def sampling_scheduler_config(scheduler_config: dict, *, prediction_type: str = "epsilon",
                              zero_terminal_snr: bool = False) -> dict:
    """The scheduler config to sample with, derived from the training scheduler config (pure)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    config["prediction_type"] = prediction_type
    if zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
        config["timestep_spacing"] = "trailing"
    return config


# kohya sd-scripts' sampler names (`--sample_sampler`, a prompt's `--ss`) -> diffusers scheduler and
# its arguments, as kohya's `get_my_scheduler` maps them; plus "dpm++_2m_karras" (the name kohya's
# docs use): DPM-Solver++ 2M with Karras sigmas. "dpmsolver++" is DPM-Solver++ 2M (order 2).
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers 0.42 refuses algorithm_type "dpmsolver" with its default final_sigmas_type "zero"
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def sampler_supports_zero_terminal_snr(name: str) -> bool:
    """Whether the sampler's diffusers scheduler can use a zero-terminal-SNR schedule."""
    import inspect

    import diffusers

    cls = getattr(diffusers, SAMPLERS[name][0])
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters


def zero_terminal_snr_samplers() -> list[str]:
    """The sampler names that can sample a zero-terminal-SNR model, in SAMPLERS' order."""
    return [name for name in SAMPLERS if sampler_supports_zero_terminal_snr(name)]


def sampling_scheduler(scheduler_config: dict, sampler: str = "ddim", *, prediction_type: str = "epsilon",
                       zero_terminal_snr: bool = False):
    """The diffusers scheduler of a kohya sampler name, built from the training scheduler's config.

    Built from the training config, so the betas, the prediction type and a zero-terminal-SNR
    schedule (rescaled betas, trailing timesteps) are the ones the model was trained with.
    """
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; samplers: {', '.join(SAMPLERS)}")
    if zero_terminal_snr and not sampler_supports_zero_terminal_snr(sampler):
        raise ValueError(f"sampler {sampler!r} cannot sample a zero-terminal-SNR model; use one of "
                         f"{', '.join(zero_terminal_snr_samplers())}")
    class_name, arguments = SAMPLERS[sampler]
    config = sampling_scheduler_config(scheduler_config, prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr)
    return getattr(diffusers, class_name).from_config({**config, **arguments})


def build_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config: dict, *,
                   prediction_type: str = "epsilon", zero_terminal_snr: bool = False, sampler: str = "ddim"):
    """A StableDiffusionPipeline around the given (possibly LoRA'd, possibly training) models.

    No safety checker. The scheduler is `sampler`'s (default DDIM) made from the training
    scheduler's config (`sampling_scheduler`); the models are used as they are (no copy, no dtype
    or mode change: `generate` switches to eval mode only while it runs).
    """
    from diffusers import StableDiffusionPipeline

    scheduler = sampling_scheduler(scheduler_config, sampler, prediction_type=prediction_type,
                                   zero_terminal_snr=zero_terminal_snr)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_zero_terminal_snr(pipe) -> bool:
    return bool(pipe.scheduler.config.get("rescale_betas_zero_snr", False))


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Put models in eval mode (no dropout) for the block; restore every submodule's flag after."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


@contextlib.contextmanager
def merged_lora(*models: torch.nn.Module | None) -> Iterator[int]:
    """The models' active LoRA adapters merged into their base weights for the block; yields how many layers.

    Inference then runs as fast as the plain model: PEFT's unmerged layers compute each delta beside
    the base layer at every call, which made sampling with a LoRA twice as slow as without on a CPU
    (one eval of the demo: 71 of its 100 s of sampling in PEFT's LoRA forward). The base weights are
    put back bit for bit afterwards (an unmerge subtracts the delta again, which leaves the last bits
    off), so the models are exactly as before. Only layers on plain float weights are merged (a
    quantized base, fp8 or NF4, keeps its unmerged adapter).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models if model is not None for m in model.modules()
              if isinstance(m, BaseTunerLayer) and not m.merged and m.active_adapters and not m.disable_adapters
              and isinstance(m.get_base_layer(), (torch.nn.Linear, torch.nn.Conv2d))
              and type(m.get_base_layer()) in (torch.nn.Linear, torch.nn.Conv2d)
              and m.get_base_layer().weight.dtype in (torch.float32, torch.float16, torch.bfloat16)]
    saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        yield len(layers)
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                if layer.merged:
                    layer.unmerge()
                layer.get_base_layer().weight.copy_(weight)


def _autocast(pipe):
    # Training on a GPU may keep the frozen base weights in fp16/bf16 next to fp32 LoRA weights:
    # autocast lets those mix. On the CPU (and for fp32 models) run as is.
    device = pipe.unet.device
    if device.type == "cuda" and pipe.unet.dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=pipe.unet.dtype)
    return contextlib.nullcontext()


def generate_decoded(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 30,
                     guidance_scale: float = 7.5, guidance_rescale: float | None = None,
                     height: int = 512, width: int = 512, negative_prompt: str | None = "",
                     batch_size: int = 4, clip_skip: int = 1, max_token_length: int = 75,
                     leaks: torch.Tensor | None = None) -> torch.Tensor:
    """Generate one image per (prompt, seed) pair; return the raw VAE decode, float32 (N, 3, H, W).

    clip_skip / max_token_length: how the prompts are encoded (lora_offset.training.text, as in
    training); with the defaults (1, 75) the pipeline encodes them itself, which is the same encoding.

    Values are in the VAE's [-1, 1] range but NOT clamped: an under-trained or noisy sample
    overshoots both ends, and clamping it would fake a mid-gray mean. Image i starts from
    torch.Generator().manual_seed(seeds[i]) noise, whatever the batching. `leaks` (N, C): start
    image i from sqrt(1 - abar) * noise + sqrt(abar) * leaks[i] instead (lora_offset.experiments.leak),
    abar at the first sampling step.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    factor = pipe.vae_scale_factor  # 8 for SD 1.x; read from the VAE, not assumed
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    if guidance_rescale is None:
        guidance_rescale = ZTSNR_GUIDANCE_RESCALE if is_zero_terminal_snr(pipe) else 0.0
    batch_size = max(1, int(batch_size))
    if leaks is not None:
        from lora_offset.experiments.leak import first_step_alpha_bar, leak_start

        if tuple(leaks.shape) != (len(seeds), pipe.vae.config.latent_channels):
            raise ValueError(f"leaks must have shape ({len(seeds)}, {pipe.vae.config.latent_channels}), got {tuple(leaks.shape)}")
        alpha_bar = first_step_alpha_bar(pipe.scheduler, steps)
    device = pipe.unet.device
    vae = pipe.vae
    decoded = []
    with eval_mode(pipe.unet, pipe.text_encoder, vae), torch.no_grad(), _autocast(pipe):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            # The initial noise is drawn on the CPU so that a seed means the same image on any device.
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
            latents = torch.stack([
                torch.randn((vae.config.latent_channels, height // factor, width // factor), generator=g)
                for g in generators
            ])
            if leaks is not None:
                latents = leak_start(latents, leaks[start:start + batch_size].float(), alpha_bar)
            latents = latents.to(device=device, dtype=pipe.unet.dtype)
            latents = pipe(
                **_prompt_inputs(pipe, chunk, [negative_prompt or ""] * len(chunk), clip_skip, max_token_length),
                height=height, width=width,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
                latents=latents,
                generator=generators,  # ancestral samplers (euler_a, dpm_2_a) draw per-step noise from it
                output_type="latent",
            ).images
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            decoded.append(image.float().cpu())
    return torch.cat(decoded)


def _prompt_inputs(pipe, prompts: list[str], negative: list[str], clip_skip: int, max_token_length: int) -> dict:
    """The pipeline's prompt arguments: the texts, or their embeddings when clip skip or long prompts are on.

    (diffusers' own clip_skip reaches for `text_encoder.text_model`, which transformers 5 removed.)
    """
    if clip_skip == 1 and max_token_length == 75:
        return {"prompt": prompts, "negative_prompt": negative}
    from lora_offset.training.text import encode_prompts

    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts + negative, clip_skip, max_token_length)
    return {"prompt_embeds": embeds[:len(prompts)], "negative_prompt_embeds": embeds[len(prompts):]}


def to_unit_range(decoded: torch.Tensor | np.ndarray) -> np.ndarray:
    """Raw decode (N, 3, H, W) in [-1, 1] -> channel-last float array (N, H, W, 3) in [0, 1], clamped."""
    x = decoded.numpy() if isinstance(decoded, torch.Tensor) else np.asarray(decoded)
    return np.clip(np.transpose(x, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)


def to_pil(images: np.ndarray) -> list:
    """(N, H, W, 3) floats in [0, 1] -> list of RGB PIL images (rounded to 8 bits as diffusers does)."""
    from PIL import Image

    return [Image.fromarray(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8), mode="RGB") for im in images]


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 30,
             guidance_scale: float = 7.5, guidance_rescale: float | None = None,
             height: int = 512, width: int = 512, negative_prompt: str = "", batch_size: int = 4,
             clip_skip: int = 1, max_token_length: int = 75) -> list:
    """One PIL image per (prompt, seed) pair; deterministic per seed.

    guidance_rescale None means 0.7 for a zero-terminal-SNR scheduler and 0 otherwise.
    """
    decoded = generate_decoded(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale,
                               guidance_rescale=guidance_rescale, height=height, width=width,
                               negative_prompt=negative_prompt, batch_size=batch_size, clip_skip=clip_skip,
                               max_token_length=max_token_length)
    return to_pil(to_unit_range(decoded))


def sample_filename(step: int, index: int, prompt: str) -> str:
    """'step000500_00_a-photo-of-sks-dog.png': zero-padded so names sort by step, then index."""
    slug = "".join(c if c.isalnum() else "-" for c in prompt.lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)[:48] or "prompt"
    return f"step{int(step):09d}_{index:02d}_{slug}.png"


def save_samples(images: Sequence, folder: str | os.PathLike, step: int, prompts: Sequence[str]) -> list[Path]:
    """Write sample images as PNGs (atomically) into `folder`; return their paths in order."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    folder = Path(folder)
    paths = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        path = folder / sample_filename(step, i, prompt)
        atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        paths.append(path)
    return paths
