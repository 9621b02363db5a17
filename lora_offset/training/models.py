"""Load the base model: a diffusers folder, a hub id, or a single-file SD 1.x checkpoint.

A local path never triggers network access. Missing pieces are reported by name before anything
large is read, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_offset.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
COMPONENT_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BaseModel:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict  # the training noise schedule (SD 1.x: scaled_linear 0.00085-0.012, 1000 steps)

    def components(self) -> dict:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}


def compute_dtype(accelerator) -> torch.dtype:
    """The dtype the frozen models compute in: accelerate's mixed precision (fp16 already fell back to "no" on a CPU)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_base_model(model_cfg, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load `model_cfg.pretrained` (see ModelConfig) in `dtype`; frozen, eval mode, on CPU."""
    source = model_cfg.pretrained
    path = Path(source).expanduser()
    if path.is_dir():
        base = _load_diffusers_folder(path, dtype, local_only=True, allow_pickle=model_cfg.allow_pickle)
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"model.pretrained = {source!r} is a {path.suffix or 'suffix-less'} file; expected a "
                            "diffusers folder or an SD 1.x checkpoint (.safetensors, or .ckpt with model.allow_pickle)")
        base = _load_single_file(path, model_cfg, dtype)
    elif HUB_ID.match(source) and not source.lower().endswith(SINGLE_FILE_SUFFIXES):
        base = _load_diffusers_folder(source, dtype, local_only=False, allow_pickle=model_cfg.allow_pickle)
    else:
        raise UserError(f"model.pretrained = {source!r} does not exist: give a diffusers folder, an SD 1.x "
                        ".safetensors file, or a hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    if model_cfg.vae:
        base.vae = _load_vae(model_cfg, dtype)
    for module in (base.unet, base.vae, base.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return base


def check_diffusers_folder(path: Path) -> None:
    """Every component a Stable Diffusion pipeline needs is there, else a UserError naming the missing one."""
    if not (path / "model_index.json").is_file():
        raise UserError(f"model.pretrained = '{path}' is a folder without model_index.json: "
                        "not a diffusers model folder (for a single .safetensors file, give the file's path)")
    for name in COMPONENTS:
        expected = path / name / COMPONENT_FILES[name]
        if not expected.is_file():
            raise UserError(f"base model folder '{path}' is missing its {name} component ({expected} not found)")


def _load_diffusers_folder(source: str | Path, dtype: torch.dtype, local_only: bool, allow_pickle: bool) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if local_only:
        check_diffusers_folder(Path(source))
    kwargs = {"local_files_only": local_only}
    # Without the opt-in, .bin (pickle) weights are never read: safetensors or an error.
    weights = {} if allow_pickle else {"use_safetensors": True}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kwargs, **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs, **weights)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kwargs, **weights)
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **kwargs))
    except (OSError, ValueError, EnvironmentError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load the base model {str(source)!r}: {first_line}") from None
    _require_sd1_unet(unet, str(source))
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler_config)


def _load_single_file(path: Path, model_cfg, dtype: torch.dtype) -> BaseModel:
    from lora_offset.formats import checkpoint

    parts = checkpoint.load_single_file(
        path, allow_pickle=model_cfg.allow_pickle, config_dir=model_cfg.config_dir, tokenizer=model_cfg.tokenizer
    )
    for name in ("unet", "vae", "text_encoder"):
        parts[name].to(dtype)
    _require_sd1_unet(parts["unet"], str(path))
    return BaseModel(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                     dict(parts["scheduler"].config))


def _load_vae(model_cfg, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    source = model_cfg.vae
    path = Path(source)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"model.vae = {source!r}: no config.json in {folder}")
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    if path.is_file():
        from lora_offset.formats import checkpoint

        return checkpoint.load_single_file_vae(path, allow_pickle=model_cfg.allow_pickle,
                                               config_dir=model_cfg.config_dir).to(dtype)
    raise UserError(f"model.vae = {source!r} does not exist")


def _require_sd1_unet(unet, source: str) -> None:
    cross = unet.config.cross_attention_dim
    blocks = list(unet.config.down_block_types)
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        raise UserError(f"{source} is an SDXL model; lora-offset trains SD 1.x models only")
    if cross == 1024:
        raise UserError(f"{source} is an SD 2.x model (cross-attention width 1024); lora-offset trains SD 1.x only")
    if blocks != ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]:
        raise UserError(f"{source}: the UNet's down blocks {blocks} are not SD 1.x's; lora-offset trains SD 1.x only")
