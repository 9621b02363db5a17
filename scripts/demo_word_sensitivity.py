"""Does the demo base's UNet use a word, and as what? A diagnostic for docs/DEMO-NOTES.md.

    python scripts/demo_word_sensitivity.py [WEIGHTS]      (default: the shipped demo_base.safetensors)

On 32 pictures of red circles from the base's world, noised to t = 999 ... 200: how much the epsilon
prediction changes when the caption "a photo of a red circle" has its colour word swapped ("blue")
or its shape word ("square"), relative to the prediction; and, with classifier-free guidance 1 and
5 as in sampling, how much the redness (R - B, 0-1 units) of the decoded x0 prediction moves when
"red" becomes "blue". Also the frozen text encoder's side: how much each swap moves its output.
"""

from __future__ import annotations

import dataclasses
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lora_offset import tiny  # noqa: E402
from lora_offset.experiments import demo_base, demo_world  # noqa: E402
from lora_offset.training.text import encode_prompts  # noqa: E402

PROMPTS = {"red circle": "a photo of a red circle", "colour swapped": "a photo of a blue circle",
           "shape swapped": "a photo of a red square"}
TIMESTEPS = (999, 900, 800, 600, 400, 200)


@torch.no_grad()
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    from diffusers import DDPMScheduler

    c = demo_base.load_components(argv[0]) if argv else demo_base.load_components()
    unet, vae = c["unet"], c["vae"]
    scale = vae.config.scaling_factor
    abar = DDPMScheduler.from_config(tiny.SD15_SCHEDULER_CONFIG).alphas_cumprod.float()
    rng = np.random.default_rng(5)
    attrs = [dataclasses.replace(demo_world.draw_attributes(rng), colour="red", shape="circle") for _ in range(32)]
    x0 = vae.encode(demo_base.to_model_range(np.stack([demo_world.render(a) for a in attrs]))).latent_dist.mean * scale
    emb = {k: encode_prompts(c["tokenizer"], c["text_encoder"], [p] * 32) for k, p in PROMPTS.items()}
    uncond = encode_prompts(c["tokenizer"], c["text_encoder"], [""] * 32)
    for k in ("colour swapped", "shape swapped"):
        per_token = ((emb[k][0] - emb["red circle"][0]).norm(dim=-1) / emb["red circle"][0].norm(dim=-1))[:9]
        print(f"text encoder, {k}: relative change per token {[round(float(v), 2) for v in per_token]}")
    g = torch.Generator().manual_seed(0)
    redness = lambda d: float((d[:, 0] - d[:, 2]).mean() / 2)  # noqa: E731
    for t in TIMESTEPS:
        a = abar[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
        steps = torch.full((32,), t)
        eps = {k: unet(xt, steps, e).sample for k, e in emb.items()}
        eps_u = unet(xt, steps, uncond).sample
        rel = {k: float((eps[k] - eps["red circle"]).norm() / eps["red circle"].norm()) for k in PROMPTS if k != "red circle"}
        gaps = []
        for w in (1.0, 5.0):
            red, blue = ((vae.decode(((xt - (1 - a).sqrt() * (eps_u + w * (eps[k] - eps_u))) / a.sqrt()) / scale).sample)
                         for k in ("red circle", "colour swapped"))
            gaps.append(redness(red) - redness(blue))
        print(f"t {t}: epsilon change, colour word {rel['colour swapped']:.4f}, shape word {rel['shape swapped']:.4f}; "
              f"x0 redness red minus blue prompt: guidance 1 {gaps[0]:+.4f}, guidance 5 {gaps[1]:+.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
