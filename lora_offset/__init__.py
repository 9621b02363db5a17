"""lora-offset: a LoRA trainer for Stable Diffusion 1.x built around offset noise.

Use it from your own training script (examples/plain_diffusers_loop.py):

    from lora_offset import offset_noise, export_kohya

    noise = offset_noise(latents, 0.1)          # instead of torch.randn_like(latents)
    ...
    export_kohya("my_lora.safetensors", unet=unet, noise={"offset": 0.1})

The public names, each imported on first use so that `import lora_offset` stays cheap (no torch):

    offset_noise(x, offset, generator=None, *, adaptive_offset=0.0, random_strength=False)
        white noise + a per-(sample, channel) constant of std `offset`           (training/noise.py)
    pyramid_noise(x, iterations, discount, generator=None)   multi-resolution noise, unit std
    sample_noise(x, NoiseConfig(...), generator=None)         white -> pyramid -> + offset
    perturb_noise(noise, gamma, generator=None)                input perturbation (Ning et al.)
    zero_terminal_snr_betas(betas)                             rescaled betas with alpha_bar_T = 0
    min_snr_weights(snr, gamma, prediction_type)               min-SNR-gamma loss weights (training/losses.py)
    NoiseConfig                                                the [noise] settings (config.py)
    kohya_state_dict(unet, text_encoder=None)                  kohya-named tensors of a PEFT LoRA (formats/kohya.py)
    export_kohya(path, unet, text_encoder=None, noise=..., ...) a kohya/A1111 file with metadata (api.py)

Every noise function takes a `torch.Generator | None` and touches no global random state.
"""

from __future__ import annotations

import importlib
import os

from lora_offset import quiet as _quiet

__version__ = "0.1.0"

# Intel MKL (torch's CPU BLAS) picks its code path per call by the memory alignment of the arrays,
# which changes from process to process: two runs of one config on two threads gave different
# gradients in their last bits, and AdamW turns those into different adapters (training/determinism.py).
# Conditional Numerical Reproducibility mode AUTO keeps one path per CPU. MKL reads the variable when
# it first runs, so it is set here, before anything computes; a user's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

# Library notices a user cannot act on (bitsandbytes logs one while it is imported) are dropped
# from here on; real warnings still show (lora_offset/quiet.py names each and why).
_quiet.install_filters()

_PUBLIC = {
    "offset_noise": "lora_offset.training.noise",
    "pyramid_noise": "lora_offset.training.noise",
    "sample_noise": "lora_offset.training.noise",
    "perturb_noise": "lora_offset.training.noise",
    "zero_terminal_snr_betas": "lora_offset.training.noise",
    "min_snr_weights": "lora_offset.training.losses",
    "NoiseConfig": "lora_offset.config",
    "kohya_state_dict": "lora_offset.formats.kohya",
    "export_kohya": "lora_offset.api",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'lora_offset' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
