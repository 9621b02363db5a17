"""A plain diffusers + PEFT LoRA training loop (the shape of diffusers' train_text_to_image_lora.py)
that trains with offset noise and writes a kohya file, through lora-offset's Python API.

The lora-offset parts are marked "# lora-offset". Offset noise is two lines: the import and

    noise = offset_noise(latents, OFFSET)   # was: noise = torch.randn_like(latents)

and `export_kohya` writes the LoRA as a kohya / A1111 .safetensors file that every web UI and
diffusers' `load_lora_weights` load. Run it on any SD 1.x diffusers folder:

    python examples/plain_diffusers_loop.py --model path/to/sd15 --images my_photos \\
        --caption "a photo of sks dog" --steps 500 --resolution 512 --out sks_dog.safetensors

(on a CPU, try it with the tiny test model: `python -c "from lora_offset.tiny import save_tiny_model;
save_tiny_model('tiny-sd')"`, then --model tiny-sd --resolution 64 --steps 4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from lora_offset import export_kohya, offset_noise  # lora-offset

OFFSET = 0.1  # the per-(sample, channel) constant's std; kohya's --noise_offset


def load_images(folder: Path, resolution: int) -> torch.Tensor:
    """Every .png/.jpg of `folder`, center-cropped and resized, as a (N, 3, R, R) tensor in [-1, 1]."""
    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")):
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    if not images:
        raise SystemExit(f"{folder}: no images")
    return torch.stack(images)


def train(model: str, images: str, caption: str, out: str, steps: int = 500, resolution: int = 512,
          rank: int = 4, learning_rate: float = 1e-4, batch_size: int = 1, seed: int = 0):
    """Train a UNet LoRA on `images` captioned `caption`; write the kohya file `out`; return the UNet."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for frozen in (text_encoder, vae, unet):
        frozen.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)

    pixels = load_images(Path(images), resolution)
    ids = tokenizer([caption], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        text = text_encoder(ids)[0]
    unet.train()
    for step in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,))]
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
        noise = offset_noise(latents, OFFSET)  # lora-offset (was: torch.randn_like(latents))
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy_latents, timesteps, text.expand(batch_size, -1, -1)).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{steps} loss {loss.item():.4f}")

    export_kohya(out, unet=unet, noise={"offset": OFFSET}, steps=steps, learning_rate=learning_rate,  # lora-offset
                 optimizer="torch.optim.AdamW", resolution=resolution, num_train_images=len(pixels), seed=seed,
                 base_model_name=Path(model).name)
    print(f"saved {out}")
    return unet


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SD 1.x diffusers folder")
    parser.add_argument("--images", required=True, help="folder of training images")
    parser.add_argument("--caption", required=True)
    parser.add_argument("--out", required=True, help="the kohya .safetensors file to write")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train(args.model, args.images, args.caption, args.out, steps=args.steps, resolution=args.resolution,
          rank=args.rank, learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed)


if __name__ == "__main__":
    main()
