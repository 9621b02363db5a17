"""The demo's base model: a small SD 1.x-topology model that has learned images of widely varying brightness.

Everything here is the recipe `scripts/train_demo_base.py` runs once (its output ships in
lora_offset/assets/demo_base.safetensors) and `lora-offset demo` expands into a diffusers folder:

- UNet: diffusers UNet2DConditionModel with SD 1.5's block types, layers_per_block=2 and module
  names, at widths (32, 64, 128, 128) instead of (320, 640, 1280, 1280); epsilon prediction on SD's
  training schedule (scaled_linear 0.00085-0.012, 1,000 steps), like SD 1.5.
- VAE: AutoencoderKL with SD's factor-8 downsampling (4 blocks) at narrow widths, trained first on
  the same synthetic images; its scaling_factor is set from the data (1 / std of the latents), as
  SD's 0.18215 was.
- Text encoder and tokenizer: lora_offset.tiny's 12-layer CLIP at width 32 and character-level
  tokenizer, random init, frozen (the base data has one caption, so a learned text encoder would
  add nothing; the demo's rare token "sks" still gets its own embedding).

Scale: 128x128 images -> 16x16 latents, 256 latent pixels per channel (SD 1.5 at 512x512: 4,096).
The mean of N independent noise values has std 1/sqrt(N), so the starting noise's per-channel mean
wanders 4x more here than in SD 1.5: this model reads less of an image's brightness from it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from lora_offset import tiny

IMAGE_SIZE = 128
BASE_CAPTION = "a photo"
CAPTION_DROPOUT = 0.1  # share of empty captions, so classifier-free guidance has an unconditional model

UNET_CONFIG = {
    **tiny.TINY_UNET_CONFIG,
    "sample_size": IMAGE_SIZE // 8,
    # SD 1.5's (320, 640, 1280, 1280) / 10: the channel count changes where SD's does, so the
    # conv_shortcut modules (and so every module name) are SD 1.5's.
    "block_out_channels": [32, 64, 128, 128],
    "attention_head_dim": 8,
}

VAE_CONFIG = {
    **tiny.TINY_VAE_CONFIG,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # replaced by 1 / std(latents) after the VAE is trained
    # No attention in the VAE's mid block: fully convolutional, so it trains on crops (4x cheaper on a CPU).
    "mid_block_add_attention": False,
}

TEXT_ENCODER_CONFIG = dict(tiny.TINY_TEXT_ENCODER_CONFIG)


# ---------------------------------------------------------------------------------------------
# Data


def base_images(n: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """n images of make_dataset.varied_array (dark to bright), as a float tensor (n, 3, size, size) in [-1, 1]."""
    from lora_offset.experiments.make_dataset import varied_array

    rng = np.random.default_rng(seed)
    arr = np.stack([varied_array(rng, size) for _ in range(n)]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2 - 1


def mean_brightness(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean luminance (Rec. 601 weights) of (n, 3, H, W) images in [-1, 1], clamped to [0, 1]."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return lum.mean(dim=(1, 2))


# ---------------------------------------------------------------------------------------------
# Components


def build_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """Random-init {unet, vae, text_encoder, tokenizer, scheduler} at the demo's sizes."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    vocab = tiny.tiny_vocab_size()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                                pad_token_id=vocab - 1, **TEXT_ENCODER_CONFIG))
    if tokenizer_dir is None:
        import tempfile

        tokenizer_dir = tempfile.mkdtemp(prefix="demo-tokenizer-")
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny.write_tiny_tokenizer(tokenizer_dir)))
    scheduler = PNDMScheduler.from_config(tiny.SD15_SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# ---------------------------------------------------------------------------------------------
# Training: VAE first, then the UNet on cached latents


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 1e-3, crop: int = 64,
              kl_weight: float = 1e-6, seed: int = 0, log_every: int = 50, log=print) -> list[float]:
    """Reconstruction (MSE + L1) plus a tiny KL term, as SD's VAE, on random crops; returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    losses = []
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        if crop < x.shape[-1]:
            top, left = (int(v) for v in torch.randint(0, (x.shape[-1] - crop) // 8 + 1, (2,), generator=g) * 8)
            x = x[..., top:top + crop, left:left + crop]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=g)
        rec = vae.decode(z).sample
        loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"vae step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unscaled latent means (as lora_offset.training.train encodes, before the scaling factor)."""
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])


def train_unet(unet, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
               batch_size: int = 16, lr: float = 1e-3, warmup: int = 50, ema_decay: float = 0.995,
               caption_dropout: float = CAPTION_DROPOUT, seed: int = 0, log_every: int = 50, log=print,
               on_checkpoint=None, checkpoint_every: int = 0):
    """Epsilon-prediction pretraining on SD's schedule from scaled latents; returns (EMA UNet, losses).

    cond/uncond are the (77, width) text embeddings of BASE_CAPTION and of "".
    """
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(tiny.SD15_SCHEDULER_CONFIG)
    abar = sched.alphas_cumprod.float()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(abar), (batch_size,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        text = torch.where(drop[:, None, None], uncond, cond)
        pred = unet(xt, t, text).sample
        loss = (pred - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"unet step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} lr {lr_sched.get_last_lr()[0]:.2e}")
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(ema, step + 1, losses)
    unet.eval()
    return ema, losses


# ---------------------------------------------------------------------------------------------
# Shipping: one fp16 safetensors file <-> a diffusers folder

WEIGHTS_NAME = "demo_base.safetensors"
ASSETS_DIR = Path(__file__).parent.parent / "assets"


def save_weights(components: dict, path: str | Path, record: dict | None = None) -> Path:
    """unet./vae./text_encoder. tensors in fp16 plus the three configs (JSON) in the metadata."""
    from safetensors.torch import save_file

    from lora_offset.fileio import atomic_path

    tensors = {}
    for name in ("unet", "vae", "text_encoder"):
        for key, value in components[name].state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to(torch.float16).contiguous()
    metadata = {
        "unet_config": json.dumps(dict(components["unet"].config)),
        "vae_config": json.dumps(dict(components["vae"].config)),
        "text_encoder_config": json.dumps(components["text_encoder"].config.to_dict()),
        "record": json.dumps(record or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_record(path: str | Path = ASSETS_DIR / WEIGHTS_NAME) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("record", "{}"))


def load_components(path: str | Path = ASSETS_DIR / WEIGHTS_NAME, tokenizer_dir: str | Path | None = None) -> dict:
    """The shipped weights as fp32 components {unet, vae, text_encoder, tokenizer, scheduler}."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    unet = UNet2DConditionModel.from_config(json.loads(meta["unet_config"]))
    vae = AutoencoderKL.from_config(json.loads(meta["vae_config"]))
    text_encoder = CLIPTextModel(CLIPTextConfig(**json.loads(meta["text_encoder_config"])))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        module.eval()
    if tokenizer_dir is None:
        import tempfile

        tokenizer_dir = tempfile.mkdtemp(prefix="demo-tokenizer-")
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny.write_tiny_tokenizer(tokenizer_dir)))
    scheduler = PNDMScheduler.from_config(tiny.SD15_SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def expand_to_diffusers(folder: str | Path, path: str | Path = ASSETS_DIR / WEIGHTS_NAME) -> Path:
    """Write the shipped weights as a diffusers folder (fp32) that `model.pretrained` accepts."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    components = load_components(path, tokenizer_dir=folder / "tokenizer")
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def now() -> float:
    return time.perf_counter()
