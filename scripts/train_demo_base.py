"""Train the demo's base model (lora_offset/experiments/demo_base.py) and write lora_offset/assets/demo_base.safetensors.

    python scripts/train_demo_base.py [--vae-steps 400] [--vae-full-steps 500] [--unet-steps 1200] [--out PATH] [--work DIR]

One torch thread (small models on a shared CPU run fastest that way). Stages: synthetic images
(make_dataset.varied_array, dark to bright) -> VAE -> latents, scaling factor = 1/std -> UNet
(epsilon, SD schedule, EMA) -> fp16 safetensors with the settings and timings in its metadata.
`--work DIR` keeps the trained VAE there so that a second run can skip that stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from lora_offset.experiments import demo_base as db  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae-steps", type=int, default=400, help="VAE steps on 64x64 crops (batch 16)")
    p.add_argument("--vae-full-steps", type=int, default=500, help="then VAE steps on whole 128x128 images (batch 8)")
    p.add_argument("--vae-init", default=None, help="start from these VAE weights (torch state dict) and skip the crop stage")
    p.add_argument("--vae-images", type=int, default=2000)
    p.add_argument("--unet-steps", type=int, default=1200)
    p.add_argument("--unet-images", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(db.ASSETS_DIR / db.WEIGHTS_NAME))
    p.add_argument("--work", default=None, help="folder for intermediate files (trained VAE)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="also write --out every N UNet steps (EMA weights)")
    args = p.parse_args(argv)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    record = {"settings": vars(args), "timings_s": {}, "torch": torch.__version__}
    t_all = time.perf_counter()
    c = db.build_components(seed=args.seed)
    work = Path(args.work) if args.work else None

    vae_file = work / "vae.pt" if work else None
    if vae_file is not None and vae_file.is_file():
        state = torch.load(vae_file, weights_only=True)
        c["vae"].load_state_dict(state)
        c["vae"].eval()
        log(f"loaded VAE from {vae_file}")
    else:
        t0 = time.perf_counter()
        images = db.base_images(args.vae_images, seed=args.seed + 1)
        if args.vae_init:
            c["vae"].load_state_dict(torch.load(args.vae_init, weights_only=True))
            log(f"VAE starts from {args.vae_init}; crop stage skipped")
        else:
            db.train_vae(c["vae"], images, steps=args.vae_steps, crop=64, seed=args.seed, log=log)
        # Whole images: the crop stage alone leaves washed-out colours and dark frames at the borders.
        losses = db.train_vae(c["vae"], images, steps=args.vae_full_steps, batch_size=8, crop=db.IMAGE_SIZE,
                              seed=args.seed + 1, log=log)
        record["timings_s"]["vae"] = round(time.perf_counter() - t0, 1)
        record["vae_final_loss"] = round(float(sum(losses[-50:]) / len(losses[-50:])), 5)
        if vae_file is not None:
            work.mkdir(parents=True, exist_ok=True)
            torch.save(c["vae"].state_dict(), vae_file)

    t0 = time.perf_counter()
    images = db.base_images(args.unet_images, seed=args.seed + 2)
    latents = db.encode_latents(c["vae"], images)
    with torch.no_grad():
        rec = c["vae"].decode(latents[:64]).sample
    record["vae_reconstruction_mse"] = round(float((rec - images[:64]).pow(2).mean()), 5)
    scaling = float(1.0 / latents.std())
    c["vae"].register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    record["scaling_factor"] = scaling
    record["data_brightness"] = {"mean": float(db.mean_brightness(images).mean()),
                                 "std": float(db.mean_brightness(images).std())}
    record["timings_s"]["latents"] = round(time.perf_counter() - t0, 1)
    log(f"latents {tuple(latents.shape)} scaling_factor {scaling:.4f} vae mse {record['vae_reconstruction_mse']}")

    cond = db.encode_prompts(c["tokenizer"], c["text_encoder"], [db.BASE_CAPTION, ""])
    t0 = time.perf_counter()

    def checkpoint(ema, step, losses):
        partial = dict(record, unet_steps_done=step, timings_s=dict(record["timings_s"], unet=round(time.perf_counter() - t0, 1)))
        db.save_weights({**c, "unet": ema}, args.out, partial)
        log(f"checkpoint at step {step} -> {args.out}")

    ema, losses = db.train_unet(c["unet"], latents, cond[0], cond[1], steps=args.unet_steps,
                                batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=log,
                                on_checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)
    record["unet_steps_done"] = args.unet_steps
    record["timings_s"]["unet"] = round(time.perf_counter() - t0, 1)
    record["unet_final_loss"] = round(float(sum(losses[-100:]) / len(losses[-100:])), 5)
    c["unet"] = ema
    record["timings_s"]["total"] = round(time.perf_counter() - t_all, 1)
    out = db.save_weights(c, args.out, record)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {json.dumps(record)}")
    if work:
        torch.save(losses, work / "unet_losses.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
