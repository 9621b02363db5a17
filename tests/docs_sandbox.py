"""The sandbox the documentation's runnable blocks run in: tiny stand-ins under the names the docs use.

A ```bash run block of README.md or docs/*.md runs as written, in a fresh copy of this folder
(tests/test_docs_run.py). Each name below is what a user has (SD 1.5, their photos, their LoRA); here
it is a tiny SD 1.x-topology stand-in (lora_offset/tiny.py), so the commands run in seconds on a CPU.
docs/writing-docs.md lists the same names (a test checks that it does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# name in the sandbox -> what it stands for (the table of docs/writing-docs.md)
SANDBOX = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "SD 1.5 (the hub id): the tiny model as a diffusers folder; a local "
                                                   "folder of that name is loaded instead of the hub",
    "v1-5-pruned-emaonly.safetensors": "SD 1.5 as a single file: the tiny model in the original LDM layout",
    "my-finetune.safetensors": "a fine-tuned checkpoint: the tiny single file with `style.safetensors` merged in",
    "output/sks_dog/sks_dog.safetensors": "your trained LoRA: a tiny kohya LoRA (UNet rank 8, conv rank 4, text "
                                          "encoder rank 8)",
    "style.safetensors": "another kohya LoRA (UNet rank 4)",
    "pytorch_lora_weights.safetensors": "a LoRA written by diffusers' training scripts (PEFT keys, adapter metadata)",
    "peft_adapter": "a PEFT adapter folder (adapter_model.safetensors, adapter_config.json)",
    "data/sks_dog": "your photos: 5 JPEG images of 64 px with a caption file each",
    "data/class_dog": "200 class images of 64 px (as many as examples/dreambooth_sd15.toml asks for)",
    "data/solid_black": "8 solid black 64-px images captioned \"a sks image\"",
    "my_dataset_config.toml": "a kohya dataset config over data/sks_dog",
    "examples": "a copy of the repository's examples/",
}

# Options appended to a `lora-offset` command of a run block, so that it runs at a test's size (a later
# option wins over an earlier one, so these replace what the block sets).
FAST = {
    "train": ["--set", "training.max_steps=2", "--set", "dataset.resolution=64", "--set", "training.sample_steps=2",
              "--set", "training.sample_every_steps=0", "--set", "training.save_every_steps=0"],
    "eval": ["--n", "1", "--steps", "2", "--resolution", "64"],
}


def images(folder: Path, n: int, size: int = 64, seed: int = 0, suffix: str = ".png", caption: str | None = None,
           name: str = "img{i}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(rng.normal(rng.uniform(0, 255), 30, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{name.format(i=i + 1)}{suffix}"
        Image.fromarray(pixels).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder


def kohya_lora(path: Path, rank: int, conv_rank: int, te_rank: int, seed: int, name: str) -> Path:
    """A kohya LoRA of the tiny model with random non-zero factors, saved as the trainer saves one."""
    from lora_offset.formats.kohya import kohya_state_dict, save_lora
    from lora_offset.tiny import build_tiny_components
    from lora_offset.training.networks import add_lora, text_encoder_lora_config, unet_lora_config

    c = build_tiny_components(seed=0)
    add_lora(c["unet"], unet_lora_config(rank, rank / 2, conv_rank=conv_rank, conv_alpha=1.0))
    if te_rank:
        add_lora(c["text_encoder"], text_encoder_lora_config(te_rank, te_rank / 2))
    g = torch.Generator().manual_seed(seed)
    for model in (c["unet"], c["text_encoder"]):
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.data = 0.05 * torch.randn(p.shape, generator=g)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
            "ss_output_name": name, "ss_base_model_version": "sd_v1"}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_lora(path, kohya_state_dict(c["unet"], c["text_encoder"] if te_rank else None), meta, precision="fp32")


def build_sandbox(root: Path, tiny_model_dir: Path) -> Path:
    """Write every entry of SANDBOX into `root`."""
    import safetensors.torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    from lora_offset.cli import main
    from lora_offset.formats.ldm import save_ldm_checkpoint
    from tests.test_convert import configs, save_diffusers_lora, trained_pipe

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_model_dir, root / "stable-diffusion-v1-5" / "stable-diffusion-v1-5")
    save_ldm_checkpoint({"unet": UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"),
                         "vae": AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae"),
                         "text_encoder": CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")},
                        root / "v1-5-pruned-emaonly.safetensors")
    kohya_lora(root / "output" / "sks_dog" / "sks_dog.safetensors", 8, 4, 8, seed=1, name="sks_dog")
    kohya_lora(root / "style.safetensors", 4, 0, 0, seed=2, name="style")
    assert main(["merge", "--base", str(root / "v1-5-pruned-emaonly.safetensors"), "--lora",
                 str(root / "style.safetensors"), "--out", str(root / "my-finetune.safetensors")]) == 0

    unet_config, te_config = configs()
    pipe = trained_pipe(tiny_model_dir, unet_config, te_config)
    save_diffusers_lora(pipe, root, unet_config, te_config)
    adapter = root / "peft_adapter"
    adapter.mkdir()
    state = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    safetensors.torch.save_file(state, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(unet_config.to_dict(), default=list), encoding="utf-8")

    images(root / "data" / "sks_dog", 5, suffix=".jpg", caption="a photo of sks dog", name="photo{i}")
    images(root / "data" / "class_dog", 200, seed=1, name="class-{i:04d}")
    black = root / "data" / "solid_black"
    black.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (64, 64)).save(black / f"{i:04d}.png")
        (black / f"{i:04d}.txt").write_text("a sks image", encoding="utf-8")
    (root / "my_dataset_config.toml").write_text(
        '[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 64\nbatch_size = 1\n\n'
        '  [[datasets.subsets]]\n  image_dir = "data/sks_dog"\n  class_tokens = "sks dog"\n', encoding="utf-8")
    shutil.copytree(REPO / "examples", root / "examples")
    return root
