"""examples/ holds complete configs for the README's stories; each loads and validates as it is, and
the commands in its header comments parse (the docs' runnable blocks train them: tests/test_docs_run.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lora_offset.config import load_config
from tests.docs_blocks import lora_offset_argv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REPO = EXAMPLES.parent


def instance_and_class(config):
    (dataset,) = config.datasets
    return [s for s in dataset.subsets if not s.is_reg], [s for s in dataset.subsets if s.is_reg]


def test_every_example_config_is_tested_here():
    assert {p.name for p in EXAMPLES.glob("*.toml")} == {
        "dreambooth_sd15.toml", "solid_black.toml", "small_gpu_nf4.toml", "train_only.toml", "dataset_kohya.toml"}


def test_subject_photos_with_prior_preservation():
    c = load_config(EXAMPLES / "dreambooth_sd15.toml")
    (subject,), (classes,) = instance_and_class(c)
    assert (subject.image_dir, subject.class_tokens) == ("data/sks_dog", "a photo of sks dog")
    assert classes.is_reg and classes.num_class_images == 200 and classes.class_tokens == "a photo of a dog"
    assert c.training.prior_loss_weight == 1.0 and c.noise.offset == 0.1 and c.model.base_precision == "auto"
    assert c.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # what the README says it does
    assert (c.training.max_steps, c.training.save_every_steps) == (1200, 400)
    assert c.adapter_path == Path("output/sks_dog/sks_dog.safetensors") and c.training.save_precision == "fp16"


def test_the_solid_black_test_and_its_standard_noise_twin():
    c = load_config(EXAMPLES / "solid_black.toml")
    (black,), classes = instance_and_class(c)
    assert (black.image_dir, black.class_tokens, classes) == ("data/solid_black", "a sks image", [])
    assert c.noise.offset == 0.1 and c.adapter_path == Path("output/solid_black/solid_black.safetensors")
    standard = load_config(EXAMPLES / "solid_black.toml",
                           ["noise.offset=0", "training.output_name=solid_black_standard"])
    assert standard.noise.offset == 0 and standard.adapter_path.name == "solid_black_standard.safetensors"


@pytest.mark.parametrize("precision", ["nf4", "fp8"])
def test_the_small_gpu_run_stores_the_frozen_unet_in_fp8_or_nf4(precision):
    c = load_config(EXAMPLES / "small_gpu_nf4.toml", [f"model.base_precision={precision}"])
    assert c.model.base_precision == precision and c.network.type == "lora"
    t = c.training
    assert t.gradient_checkpointing and t.cache_latents and t.cache_text_embeddings and t.optimizer == "adamw8bit"
    assert c.dataset.batch_size == 1 and t.sample_every_steps == 0
    (subject,), (classes,) = instance_and_class(c)
    assert subject.image_dir == "data/sks_dog" and classes.num_class_images == 200
    assert load_config(EXAMPLES / "small_gpu_nf4.toml").model.base_precision == "nf4"


def test_the_commands_in_the_examples_comments_parse():
    from lora_offset.cli import COMMANDS, build_parser

    found = 0
    for path in sorted(EXAMPLES.glob("*.toml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not re.match(r"#\s+lora-offset ", line):
                continue
            text = line.lstrip("# ")
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + lines[i].lstrip("# ")
            argv = lora_offset_argv(shlex.split(text))
            args = build_parser({argv[0]: COMMANDS[argv[0]]}).parse_args(argv)
            found += 1
            if argv[0] == "train":  # the config it names exists and loads (from the repository root)
                load_config(REPO / args.config, args.overrides,
                            REPO / args.dataset_config if args.dataset_config else None)
    assert found >= 5
