"""SD 1.5's component configs (no weights): full-size models on the meta device or random-init for benchmarks."""

from __future__ import annotations

from pathlib import Path

SD15_CONFIG_DIR = Path(__file__).parent


def build_sd15(component: str, device: str = "meta"):
    """Build SD 1.5's `unet`, `vae` or `text_encoder` from its config, on `device` ("meta": no memory)."""
    import torch

    folder = SD15_CONFIG_DIR / component
    with torch.device(device):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
        if component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
    raise ValueError(f"unknown SD 1.5 component {component!r}: expected unet, vae or text_encoder")
