"""Test set-up: one torch thread (tiny models on 2 shared cores run far faster that way), no
network, quiet libraries, and a tiny SD 1.x-topology model built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny SD 1.x model saved as a diffusers folder (random init, fixed seed). Do not modify it."""
    from lora_offset.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture()
def tiny_components():
    """Fresh in-memory tiny components {unet, vae, text_encoder, tokenizer, scheduler} (seed 0)."""
    from lora_offset.tiny import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture(scope="session")
def kohya_dataset_config(tmp_path_factory):
    """kohya's dataset TOML over one 64x64 image with a .txt caption (kohya's default extension is .caption)."""
    from tests.test_train import make_images

    root = tmp_path_factory.mktemp("kohya-data")
    images = make_images(root / "img", 1)
    (images / "img0.txt").write_text("sks dog", encoding="utf-8")
    path = root / "my_dataset_config.toml"
    path.write_text(f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 64\nbatch_size = 1\n\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{images.as_posix()}"\n  num_repeats = 1\n',
                    encoding="utf-8")
    return path
