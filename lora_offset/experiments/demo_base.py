"""The demo's base model: a small, text-conditioned SD 1.x-topology model with SD 1.5's grey problem.

`scripts/train_demo_base.py` runs this recipe once; its output ships in
lora_offset/assets/demo_base.safetensors and `lora-offset demo` expands it into a diffusers folder
that the real `train` and `eval` code load like any SD 1.5 model.

- Data: lora_offset/experiments/demo_world.py, 128x128 pictures that follow compositional captions
  (brightness, colour, shape, background words; "sks" never appears).
- VAE: AutoencoderKL with SD's factor-8 downsampling (4 blocks) at narrow widths, trained first on
  the pictures, with a loss on 8x8-averaged colours as well so that colour and brightness survive.
- Text encoder: CLIP's 12-layer layout at width 64 with a word-level tokenizer over the world's
  vocabulary; frozen at a random initialisation while the UNet learns, as SD 1.5's UNet learned
  under a frozen CLIP (see TOKEN_EMBEDDING_STD).
- UNet: SD 1.5's block types, layers_per_block 2 and module names at widths (32, 64, 128, 128);
  epsilon prediction on SD's training schedule, like SD 1.5.

SD 1.5's numbers, matched (see ../shared/OFFSET-NOISE-SCIENCE.md): what makes SD grey is how far a
dark image's leak at the first sampling step, sqrt(abar) * m (m = its latent channel mean), sits
from pure noise, in units of the noise's own channel-mean spread 1/sqrt(H*W). 128x128 pictures give
16x16 latents, 16x fewer latent pixels than SD 1.5 at 512x512, so the spread is 4x wider; scaling the
latents 4x (LATENT_AMPLITUDE: the VAE's scaling_factor is 4 / std instead of SD's ~1 / std) puts the
leak as far out as in SD 1.5, and the offset-noise strength that matches SD 1.5's 0.1 is 4 x 0.1.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_offset import tiny
from lora_offset.experiments import demo_world
from lora_offset.training.text import encode_prompts  # CLIP's own 77-token encoding at 75 tokens (tested)

IMAGE_SIZE = demo_world.IMAGE_SIZE
LATENT_SIZE = IMAGE_SIZE // 8
SD15_LATENT_SIZE = 64  # SD 1.5 at 512x512
LATENT_AMPLITUDE = SD15_LATENT_SIZE / LATENT_SIZE  # sqrt(4096 / 256) = 4

UNET_CONFIG = {
    **tiny.TINY_UNET_CONFIG,
    "sample_size": LATENT_SIZE,
    # SD 1.5's (320, 640, 1280, 1280) / 10: the channel count changes where SD's does, so the
    # conv_shortcut modules (and so every module name) are SD 1.5's.
    "block_out_channels": [32, 64, 128, 128],
    # Heads of 32 channels (SD 1.5: 8 heads at every level). 8 heads of 4 channels each cost
    # 2.5x the CPU time for nothing.
    "attention_head_dim": [1, 2, 4, 4],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
}

VAE_CONFIG = {
    **tiny.TINY_VAE_CONFIG,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # set to LATENT_AMPLITUDE / std(latents) after the VAE is trained
    "mid_block_add_attention": False,
}

TEXT_ENCODER_CONFIG = {
    **tiny.TINY_TEXT_ENCODER_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 256,
    "projection_dim": 64,
}

# The text encoder is frozen at its random initialisation (SD 1.5 trains its UNet under a frozen CLIP
# too). Trained jointly from scratch it collapsed: at lr 1e-3 the spread of its outputs across
# captions fell from ~40 % to ~5 % of their size within 200 steps, and the UNet stopped reading it.
# Token embeddings of std 1 (CLIP's init is 0.02) keep the words apart after 12 random layers; at
# 0.02 the position embeddings dominate and every caption looks alike.
TOKEN_EMBEDDING_STD = 1.0

# v5: before it is frozen, the text encoder learns to say what a caption holds (brightness, colour,
# shape, background) in the mean of its 77 output states, as CLIP's training puts the caption into
# its end-of-text and padding states. At its random init the 68 padding states of a short caption
# barely carry it (red vs blue changes them by 2.8 % of their norm, measured; after this stage 90 %),
# so the UNet's cross-attention first had to find one token among 77 before it could read a word.
TEXT_PRETRAIN_LR = 3e-4

HIGH_NOISE_FROM = 600  # timesteps where the leak no longer shows shapes and colours: the text must

WEIGHTS_NAME = "demo_base.safetensors"
ASSETS_DIR = Path(__file__).parent.parent / "assets"


# ---------------------------------------------------------------------------------------------
# Components


def write_tokenizer(folder: str | Path) -> Path:
    return tiny.write_tiny_tokenizer(folder, words=demo_world.vocabulary())


def load_tokenizer(folder: str | Path | None = None):
    """The word-level tokenizer, written to `folder` (or a temporary folder) and loaded."""
    from transformers import CLIPTokenizer

    if folder is not None:
        return CLIPTokenizer.from_pretrained(str(write_tokenizer(folder)))
    with tempfile.TemporaryDirectory(prefix="demo-tokenizer-") as tmp:  # read into memory at load
        return CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp)))


def text_encoder_config() -> dict:
    vocab = tiny.tiny_vocab_size(demo_world.vocabulary())
    return {**TEXT_ENCODER_CONFIG, "vocab_size": vocab, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1}


def build_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """Random-init {unet, vae, text_encoder, tokenizer, scheduler} at the demo's sizes."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config()))
    with torch.no_grad():
        getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding.weight.normal_(
            0, TOKEN_EMBEDDING_STD)
    scheduler = PNDMScheduler.from_config(tiny.SD15_SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": load_tokenizer(tokenizer_dir),
            "scheduler": scheduler}


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, chunk: int = 64) -> torch.Tensor:
    """Encode and decode (N, H, W, 3) pictures in [0, 1]: raw decodes (N, 3, H, W) in [-1, 1]."""
    x = to_model_range(images)
    return torch.cat([vae.decode(vae.encode(x[i:i + chunk]).latent_dist.mean).sample for i in range(0, len(x), chunk)])


# ---------------------------------------------------------------------------------------------
# Training: VAE first, then UNet and text encoder together on cached latents


def train_vae(vae, steps: int, batch_size: int = 8, crop: int = IMAGE_SIZE, lr: float = 1e-3, kl_weight: float = 1e-6,
              colour_weight: float = 4.0, seed: int = 0, log_every: int = 50, log=print) -> list[float]:
    """MSE + L1 + KL (SD's VAE recipe, minus the GAN) + MSE of 8x8-averaged colours, on fresh pictures
    (random `crop` x `crop` windows at latent-pixel positions: the VAE is fully convolutional).

    The colour term is what keeps colour and brightness: a latent pixel covers 8x8 image pixels, and
    without it a small VAE spends its capacity on edges and returns washed-out greys."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    losses = []
    for step in range(steps):
        images = np.stack([demo_world.render(demo_world.draw_attributes(rng)) for _ in range(batch_size)])
        x = to_model_range(images)
        if crop < IMAGE_SIZE:
            top, left = (int(v) * 8 for v in rng.integers(0, (IMAGE_SIZE - crop) // 8 + 1, size=2))
            x = x[..., top:top + crop, left:left + crop]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g)).sample
        colour = F.mse_loss(F.avg_pool2d(rec, 8), F.avg_pool2d(x, 8))
        loss = F.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean() + colour_weight * colour + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"vae step {step + 1}/{steps} (crop {crop}) loss {np.mean(losses[-log_every:]):.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def center_latents(vae, channel_mean: torch.Tensor) -> None:
    """Shift the VAE so that its latents have channel mean 0 over the data: the encoder's output
    bias loses `channel_mean`, the decoder's first 1x1 conv gains it back (exact, both are affine).

    Then pure noise (channel means ~ 0) sits at the data's average, as in SD 1.5, whose natural-image
    latents average within about one spread of 0 while a black image's lie far out."""
    n = vae.config.latent_channels
    vae.quant_conv.bias[:n] -= channel_mean
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ channel_mean


@torch.no_grad()
def encode_world(vae, n: int, seed: int, chunk: int = 256) -> tuple[torch.Tensor, list]:
    """Unscaled latent means of n fresh pictures (as lora_offset's trainer encodes) and their attributes."""
    rng = np.random.default_rng(seed)
    latents, attrs = [], []
    for start in range(0, n, chunk):
        batch = [demo_world.draw_attributes(rng) for _ in range(min(chunk, n - start))]
        images = np.stack([demo_world.render(a) for a in batch])
        latents.append(vae.encode(to_model_range(images)).latent_dist.mean)
        attrs += batch
    return torch.cat(latents), attrs


def train_text_encoder_on_captions(text_encoder, tokenizer, steps: int, batch_size: int = 64,
                                   lr: float = TEXT_PRETRAIN_LR, seed: int = 0, log_every: int = 50,
                                   log=print) -> list[float]:
    """Teach the text encoder what its captions say: linear heads read the four attributes
    (demo_world.caption_labels, "dropped" included) from the mean of its output states, cross-entropy,
    captions drawn fresh. No weight decay: words that never appear ("sks"'s letters) keep their init.
    The heads are thrown away; the encoder is left in eval mode for the caller to freeze."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(width, len(names) + 1) for names in (
        demo_world.BRIGHTNESS, demo_world.HUES, demo_world.SHAPES, demo_world.BACKGROUNDS)])
    opt = torch.optim.AdamW(list(text_encoder.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    text_encoder.train()
    losses = []
    for step in range(steps):
        captions = [demo_world.draw_caption(rng, demo_world.draw_attributes(rng)) for _ in range(batch_size)]
        labels = torch.tensor([demo_world.caption_labels(c) for c in captions])
        pooled = encode_prompts(tokenizer, text_encoder, captions).mean(dim=1)
        loss = sum(F.cross_entropy(head(pooled), labels[:, k]) for k, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"text step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f}")
    text_encoder.eval()
    return losses


LOSS_WEIGHTINGS = ("epsilon", "v")


def loss_weights(alpha_bar: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weights of the epsilon MSE. "epsilon": 1 (SD 1.5's loss). "v": 1 / alpha_bar, which
    makes it exactly the v-prediction loss (v - v_hat = (eps - eps_hat) / sqrt(alpha_bar)) while the
    model still predicts epsilon. The epsilon loss weighs an x0 error by the SNR (0.005 at t = 999),
    so at high noise, where only the text can say an object's colour, the words bring almost no
    signal; the v loss weighs it by SNR + 1."""
    if weighting == "epsilon":
        return torch.ones_like(alpha_bar)
    if weighting == "v":
        return 1.0 / alpha_bar
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")


def train_unet_and_text(unet, text_encoder, tokenizer, latents: torch.Tensor, attrs: list, steps: int,
                        batch_size: int = 32, lr: float = 1e-3, text_lr: float | None = None,
                        high_noise_share: float = 0.0, high_noise_from: int | None = None, warmup: int = 100,
                        loss_weighting: str = "epsilon",
                        ema_decay: float = 0.998, seed: int = 0, log_every: int = 50, log=print, on_checkpoint=None,
                        checkpoint_every: int = 0):
    """Epsilon prediction on SD's schedule from scaled latents, captions drawn fresh each step
    (demo_world.draw_caption). text_lr 0 keeps the text encoder frozen (the recipe, see
    TOKEN_EMBEDDING_STD); otherwise it learns too. A share `high_noise_share` of the timesteps is drawn
    from [high_noise_from (default HIGH_NOISE_FROM), 1000), where the text matters most; the loss is the
    batch's epsilon MSE weighted by `loss_weights` (normalised by their sum). Returns (EMA UNet, EMA
    text encoder, unweighted epsilon losses)."""
    from diffusers import DDPMScheduler

    abar = DDPMScheduler.from_config(tiny.SD15_SCHEDULER_CONFIG).alphas_cumprod.float()
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    text_frozen = text_lr == 0
    groups = [{"params": list(unet.parameters()), "lr": lr}]
    if not text_frozen:
        groups.append({"params": list(text_encoder.parameters()), "lr": lr if text_lr is None else text_lr})
    params = [p for group in groups for p in group["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    if text_frozen:
        ema_text = text_encoder.eval().requires_grad_(False)
    else:
        ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
        text_encoder.train()
    ema_params = list(ema_unet.parameters()) + ([] if text_frozen else list(ema_text.parameters()))
    pairs = list(zip(ema_params, params))
    unet.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        captions = [demo_world.draw_caption(rng, attrs[i]) for i in idx.tolist()]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(abar), (batch_size,), generator=g)
        high = torch.rand(batch_size, generator=g) < high_noise_share
        t = torch.where(high, torch.randint(high_noise_from or HIGH_NOISE_FROM, len(abar), (batch_size,), generator=g), t)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, encode_prompts(tokenizer, text_encoder, captions)).sample
        per_sample = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
        weights = loss_weights(abar[t], loss_weighting)
        loss = (weights * per_sample).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in pairs:
                pe.lerp_(p, 1 - decay)
        losses.append(per_sample.mean().item())
        if log_every and (step + 1) % log_every == 0:
            log(f"unet step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} lr {lr_sched.get_last_lr()[0]:.2e}")
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(ema_unet, ema_text, step + 1, losses)
    unet.eval()
    text_encoder.eval()
    return ema_unet, ema_text, losses


# ---------------------------------------------------------------------------------------------
# Shipping: one fp16 safetensors file <-> a diffusers folder


def save_weights(components: dict, path: str | Path, record: dict | None = None) -> Path:
    """unet./vae./text_encoder. tensors in fp16 plus the three configs (JSON) and the record in the metadata."""
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
    from transformers import CLIPTextConfig, CLIPTextModel

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
    scheduler = PNDMScheduler.from_config(tiny.SD15_SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": load_tokenizer(tokenizer_dir),
            "scheduler": scheduler}


def expand_to_diffusers(folder: str | Path, path: str | Path = ASSETS_DIR / WEIGHTS_NAME) -> Path:
    """Write the shipped weights as a diffusers folder (fp32) that `model.pretrained` accepts."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    components = load_components(path, tokenizer_dir=folder / "tokenizer")
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
