"""Train the demo's base model (lora_offset/experiments/demo_base.py) and write lora_offset/assets/demo_base.safetensors.

    python scripts/train_demo_base.py [--vae-crop-steps 1000] [--vae-full-steps 300] [--text-steps 300]
                                      [--unet-steps 1000] [--loss-weighting v] [--out PATH] [--work DIR]

One torch thread (small models on a shared CPU run fastest that way). Stages: VAE on fresh
demo_world pictures (64x64 crops, then whole 128x128 pictures) -> latents of --latent-images
pictures, scaling factor = LATENT_AMPLITUDE / std -> the text encoder learns what captions say
(--text-steps, then frozen) -> UNet under the frozen text encoder (epsilon prediction with the v loss's
weights, SD's schedule, captions drawn fresh each step, EMA) -> fp16 safetensors with the settings, losses,
timings and VAE checks in its metadata. Every random draw is seeded by --seed: the same command on
the same software gives the same file. `--work DIR` keeps the trained VAE so a second run can skip it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from lora_offset.experiments import demo_base as db  # noqa: E402
from lora_offset.experiments import demo_world  # noqa: E402


@torch.no_grad()
def vae_checks(vae, n: int = 256, seed: int = 99) -> dict:
    """How well colour and brightness survive encode -> decode, on fresh pictures."""
    images, _ = demo_world.draw_dataset(n, seed=seed)
    rec01 = (db.reconstruct(vae, images) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    pooled = lambda a: a.reshape(n, 16, 8, 16, 8, 3).mean(axis=(2, 4))  # noqa: E731  (8x8 cells)
    return {
        "pixel_rmse": float(np.sqrt(((rec01 - images) ** 2).mean())),
        "cell_colour_rmse": float(np.sqrt(((pooled(rec01) - pooled(images)) ** 2).mean())),
        "brightness_abs_error": float(np.abs(demo_world.mean_luminance(rec01) - demo_world.mean_luminance(images)).mean()),
        "n": n,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae-crop-steps", type=int, default=1000, help="VAE steps on 64x64 crops (batch 16)")
    p.add_argument("--vae-full-steps", type=int, default=300, help="then VAE steps on whole 128x128 pictures (batch 8)")
    p.add_argument("--latent-images", type=int, default=6000, help="pictures encoded once for the UNet stage")
    p.add_argument("--unet-steps", type=int, default=1000,
                   help="UNet steps: one whole cosine schedule (v6: 1,000; v5's 2,000 lost colour following in its low-lr half)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--text-lr", type=float, default=0.0,
                   help="0 keeps the text encoder frozen while the UNet learns (see demo_base)")
    p.add_argument("--text-steps", type=int, default=300,
                   help="steps (batch 64) in which the text encoder first learns what captions say; 0 keeps its random init")
    p.add_argument("--loss-weighting", choices=db.LOSS_WEIGHTINGS, default="v",
                   help="epsilon MSE weighted as SD 1.5 (epsilon) or as the v-prediction loss (v)")
    p.add_argument("--high-noise-share", type=float, default=0.3,
                   help="share of timesteps drawn from [--high-noise-from, 1000), where the text matters most")
    p.add_argument("--high-noise-from", type=int, default=db.HIGH_NOISE_FROM)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(db.ASSETS_DIR / db.WEIGHTS_NAME))
    p.add_argument("--work", default=None, help="folder for intermediate files (the trained VAE)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="also write --out every N UNet steps (EMA weights)")
    args = p.parse_args(argv)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    record = {"settings": vars(args), "timings_s": {}, "torch": torch.__version__,
              "latent_amplitude": db.LATENT_AMPLITUDE, "token_embedding_std": db.TOKEN_EMBEDDING_STD}
    t_all = time.perf_counter()
    c = db.build_components(seed=args.seed)
    work = Path(args.work) if args.work else None

    vae_file = work / "vae.pt" if work else None
    if vae_file is not None and vae_file.is_file():
        c["vae"].load_state_dict(torch.load(vae_file, weights_only=True))
        c["vae"].eval()
        record["vae_loaded_from"] = str(vae_file)  # its own training is not in this record
        log(f"loaded VAE from {vae_file}")
    else:
        t0 = time.perf_counter()
        db.train_vae(c["vae"], steps=args.vae_crop_steps, batch_size=16, crop=64, seed=args.seed, log=log)
        # Whole pictures: crops alone leave dark frames at the borders (zero padding never trained).
        losses = db.train_vae(c["vae"], steps=args.vae_full_steps, batch_size=8, lr=3e-4, seed=args.seed + 1, log=log)
        record["timings_s"]["vae"] = round(time.perf_counter() - t0, 1)
        record["vae_final_loss"] = round(float(np.mean(losses[-50:])), 5)
        if vae_file is not None:
            work.mkdir(parents=True, exist_ok=True)
            torch.save(c["vae"].state_dict(), vae_file)
    record["vae_checks"] = vae_checks(c["vae"])
    log(f"vae checks {record['vae_checks']}")

    t0 = time.perf_counter()
    latents, attrs = db.encode_world(c["vae"], args.latent_images, seed=args.seed + 2)
    channel_mean = latents.mean(dim=(0, 2, 3))
    db.center_latents(c["vae"], channel_mean)
    latents = latents - channel_mean.view(1, -1, 1, 1)
    record["latent_centering"] = [round(float(v), 4) for v in channel_mean]
    scaling = float(db.LATENT_AMPLITUDE / latents.std())
    c["vae"].register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    record["scaling_factor"] = scaling
    by_word = {}
    for word in demo_world.BRIGHTNESS:
        rows = [i for i, a in enumerate(attrs) if a.brightness == word]
        by_word[word] = [round(float(v), 3) for v in latents[rows].mean(dim=(0, 2, 3))]
    record["latent_channel_mean_by_brightness"] = by_word
    record["timings_s"]["latents"] = round(time.perf_counter() - t0, 1)
    log(f"latents {tuple(latents.shape)} scaling_factor {scaling:.4f} channel means by brightness {by_word}")

    if args.text_steps:
        t0 = time.perf_counter()
        text_losses = db.train_text_encoder_on_captions(c["text_encoder"], c["tokenizer"], args.text_steps,
                                                        seed=args.seed + 3, log=log)
        record["timings_s"]["text"] = round(time.perf_counter() - t0, 1)
        record["text_final_loss"] = round(float(np.mean(text_losses[-50:])), 5)

    t0 = time.perf_counter()

    def checkpoint(ema_unet, ema_text, step, losses):
        partial = dict(record, unet_steps_done=step, unet_loss_last_100=round(float(np.mean(losses[-100:])), 5),
                       timings_s=dict(record["timings_s"], unet=round(time.perf_counter() - t0, 1)))
        db.save_weights({**c, "unet": ema_unet, "text_encoder": ema_text}, args.out, partial)
        log(f"checkpoint at step {step} -> {args.out}")

    ema_unet, ema_text, losses = db.train_unet_and_text(
        c["unet"], c["text_encoder"], c["tokenizer"], latents, attrs, steps=args.unet_steps,
        batch_size=args.batch_size, lr=args.lr, text_lr=args.text_lr, high_noise_share=args.high_noise_share,
        high_noise_from=args.high_noise_from, loss_weighting=args.loss_weighting,
        seed=args.seed, log=log,
        on_checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)
    record["unet_steps_done"] = args.unet_steps
    record["timings_s"]["unet"] = round(time.perf_counter() - t0, 1)
    record["unet_loss_last_100"] = round(float(np.mean(losses[-100:])), 5)
    record["unet_loss_curve"] = [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]
    record["timings_s"]["total"] = round(time.perf_counter() - t_all, 1)
    out = db.save_weights({**c, "unet": ema_unet, "text_encoder": ema_text}, args.out, record)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {json.dumps(record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
