"""Through the CLI: a kohya dataset TOML with every implemented key and two [[datasets]] of different
resolutions; masked training with cached latents; the validation loss, the same in every run and on resume."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import toml
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_offset.cli import main
from lora_offset.formats.kohya_dataset import KOHYA_KEYS, REFUSED


def rgba_images(folder: Path, n: int, size=(96, 64), seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 4)).astype(np.uint8)
        arr[..., 3] = 0
        arr[8:-8, 16:-16, 3] = 255  # an opaque subject on a transparent background
        Image.fromarray(arr, mode="RGBA").save(folder / f"img{i}.png")
    return folder


def rgb_images(folder: Path, n: int, size=(64, 64), seed=1, captions=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.caption").write_text(captions[i % len(captions)], encoding="utf-8")
    return folder


def write_main(tmp_path: Path, model_dir: Path, **training) -> Path:
    config = {"model": {"pretrained": str(model_dir)}, "network": {"rank": 4, "alpha": 1.0},
              "training": {"output_dir": str(tmp_path / "out"), "output_name": "tiny", "max_steps": 4,
                           "mixed_precision": "no", "learning_rate": 1e-3, "seed": 0, "save_precision": "fp32",
                           "optimizer": "adamw", **training}}
    path = tmp_path / "config.toml"
    path.write_text(toml.dumps(config), encoding="utf-8")
    return path


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def test_a_kohya_dataset_file_with_every_implemented_key_and_two_resolutions_trains(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    from lora_offset.training.networks import lora_module_names

    subject = rgb_images(tmp_path / "data" / "10_sks dog", 4, size=(96, 64),
                         captions=["sks dog;;red, grass ||| sunny, {day|night}", "sks dog;;blue, beach ||| sunset"])
    masks = tmp_path / "data" / "masks"
    masks.mkdir()
    for i in range(4):  # the middle half of each image counts
        mask = np.zeros((64, 96), np.uint8)
        mask[:, 24:72] = 255
        Image.fromarray(mask).save(masks / f"img{i}.png")
    reg = rgb_images(tmp_path / "data" / "reg", 2, seed=5)
    cutouts = rgba_images(tmp_path / "data" / "cutouts", 3, size=(160, 96))
    dataset_toml = tmp_path / "dataset.toml"
    dataset_toml.write_text(f"""
[general]
shuffle_caption = true
caption_extension = ".caption"
keep_tokens = 1
caption_separator = ","
keep_tokens_separator = "|||"
secondary_separator = ";;"
enable_wildcard = true
caption_prefix = "photo,"
caption_suffix = ", 4k"
caption_dropout_rate = 0.1
caption_dropout_every_n_epochs = 5
caption_tag_dropout_rate = 0.1
token_warmup_min = 1
token_warmup_step = 2
flip_aug = true
validation_seed = 3

[[datasets]]
resolution = 64
batch_size = 2
resize_interpolation = "bicubic"
validation_split = 0.25

  [[datasets.subsets]]
  image_dir = "{subject.as_posix()}"
  conditioning_data_dir = "{masks.as_posix()}"
  random_crop = true
  color_aug = true

  [[datasets.subsets]]
  image_dir = "{reg.as_posix()}"
  is_reg = true
  class_tokens = "dog"
  num_repeats = 2
  shuffle_caption = false

[[datasets]]
resolution = [128, 64]
batch_size = 1
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 192
bucket_reso_steps = 64
bucket_no_upscale = false

  [[datasets.subsets]]
  image_dir = "{cutouts.as_posix()}"
  class_tokens = "sks cutout"
  alpha_mask = true
  resize_interpolation = "area"
""", encoding="utf-8")
    used = set()
    parsed = tomllib.loads(dataset_toml.read_text())
    for table in [parsed["general"], *parsed["datasets"], *(s for d in parsed["datasets"] for s in d["subsets"])]:
        used |= set(table) - {"subsets"}
    assert used == KOHYA_KEYS - set(REFUSED)  # every implemented key of kohya's schema
    config = write_main(tmp_path, tiny_model_dir, cache_latents=False, masked_loss=True, max_steps=6,
                        validate_every_n_steps=3)
    assert main(["train", "--config", str(config), "--dataset-config", str(dataset_toml)]) == 0

    adapter = tmp_path / "out" / "tiny.safetensors"
    meta = metadata(adapter)
    datasets = json.loads(meta["ss_datasets"])
    assert [(d["resolution"], d["batch_size_per_device"], d["enable_bucket"]) for d in datasets] == [
        ([64, 64], 2, False), ([128, 64], 1, True)]
    # 4 images, 1 held out for validation (ceil(4 x 0.75) = 3 train), 10 repeats; 3 cut-outs once each
    assert [(d["num_train_images"], d["num_reg_images"], d["num_validation_images"]) for d in datasets] == [
        (30, 2, 1), (3, 0, 0)]
    first, second = datasets
    assert [s["image_dir"] for s in first["subsets"]] == ["10_sks dog", "reg"]
    assert first["subsets"][0]["random_crop"] and first["subsets"][0]["color_aug"]
    assert first["subsets"][0]["conditioning_data_dir"] == masks.as_posix()
    assert second["subsets"][0]["alpha_mask"] and second["subsets"][0]["resize_interpolation"] == "area"
    assert second["bucket_info"]["buckets"]["0"]["resolution"] == [128, 64]
    assert (meta["ss_num_train_images"], meta["ss_masked_loss"], meta["ss_validation_split"]) == ("33", "True", "0.25")
    assert (meta["ss_num_validation_images"], meta["ss_validation_seed"]) == ("1", "3")
    assert set(scalars(tmp_path / "out" / "logs", "loss/validation")) == {3, 6}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.load_lora_weights(str(adapter))  # a leftover key would raise
    assert len(lora_module_names(pipe.unet)) == 192
    assert all(torch.isfinite(v).all() for v in load_file(adapter).values())


def test_validation_loss_is_the_same_in_every_run_and_after_resume(tmp_path, tiny_model_dir):
    """Masked training from cached latents (alpha_mask, both flips cached) with a validation split and LoRA
    dropout: two runs log the same validation losses, a run resumed at step 2 logs the same loss at step 4,
    and a run that never validates trains the same adapter."""
    images = rgba_images(tmp_path / "data" / "cutouts", 5)
    runs = {}
    for name in ("a", "b", "c", "never"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_main(folder, tiny_model_dir, save_state_every_steps=2, output_dir=str(folder / "out"),
                            validate_every_n_steps=1000 if name == "never" else 2)
        data = toml.loads(config.read_text())
        data["dataset"] = {"resolution": 64, "batch_size": 2, "validation_split": 0.4, "enable_bucket": True,
                           "min_bucket_reso": 64, "max_bucket_reso": 128,
                           "subsets": [{"image_dir": str(images), "class_tokens": "sks", "alpha_mask": True,
                                        "flip_aug": True}]}
        data["noise"] = {"offset": 0.1, "input_perturbation": 0.1}
        data["network"]["dropout"] = 0.1  # off while validating
        config.write_text(toml.dumps(data))
        runs[name] = config
    assert main(["train", "--config", str(runs["a"])]) == 0
    assert main(["train", "--config", str(runs["b"])]) == 0
    a, b = (scalars(tmp_path / n / "out" / "logs", "loss/validation") for n in ("a", "b"))
    assert set(a) == {2, 4} and a == b
    assert a[2] != a[4]  # the adapter changed between them: the numbers are not a constant
    assert main(["train", "--config", str(runs["c"]), "--resume", str(tmp_path / "a" / "out" / "state")]) == 0
    c = scalars(tmp_path / "c" / "out" / "logs", "loss/validation")
    assert c == {4: a[4]}
    # validating takes nothing from the training's random streams: the same adapter as without it
    assert main(["train", "--config", str(runs["never"])]) == 0
    assert scalars(tmp_path / "never" / "out" / "logs", "loss/validation") == {}
    trained, unvalidated = (load_file(tmp_path / n / "out" / "tiny.safetensors") for n in ("a", "never"))
    assert all(torch.equal(trained[k], unvalidated[k]) for k in trained)
    meta = metadata(tmp_path / "a" / "out" / "tiny.safetensors")
    assert (meta["ss_num_validation_images"], meta["ss_masked_loss"], meta["ss_validate_every_n_steps"]) == (
        "2", "True", "2")


def test_native_datasets_config_trains_two_resolutions(tmp_path, tiny_model_dir):
    config = write_main(tmp_path, tiny_model_dir, max_steps=3)
    data = toml.loads(config.read_text())
    data["datasets"] = [
        {"resolution": 64, "subsets": [{"image_dir": str(rgb_images(tmp_path / "a", 2)), "class_tokens": "sks"}]},
        {"resolution": 128, "batch_size": 2,
         "subsets": [{"image_dir": str(rgb_images(tmp_path / "b", 2, size=(128, 128))), "class_tokens": "sks"}]},
    ]
    config.write_text(toml.dumps(data))
    assert main(["train", "--config", str(config)]) == 0
    datasets = json.loads(metadata(tmp_path / "out" / "tiny.safetensors")["ss_datasets"])
    assert [d["resolution"] for d in datasets] == [[64, 64], [128, 128]]


def test_the_docs_list_every_refused_key_with_its_reason():
    page = (Path(__file__).resolve().parents[1] / "docs" / "kohya.md").read_text(encoding="utf-8")
    section = page[page.index("## kohya dataset files"):]
    section = section[:section.index("\n## ")]
    for key in REFUSED:
        assert f"| `{key}` |" in section, key
