"""kohya's dataset-config TOML: every key of kohya's schema is implemented or refused (one error each),
several [[datasets]], kohya's cascade general -> dataset -> subset; the native [[datasets]] form."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lora_offset.config import Config, DatasetConfig, SubsetConfig, load_config
from lora_offset.errors import UserError
from lora_offset.formats.kohya_dataset import DATASET_KEYS, KOHYA_KEYS, REFUSED, SUBSET_KEYS, SUBSET_ONLY_KEYS

MODEL = '[model]\npretrained = "x"\n'


def write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_kohya(tmp_path: Path, text: str, main: str = MODEL) -> Config:
    return load_config(write(tmp_path, main, "config.toml"), dataset_config=write(tmp_path, text, "dataset.toml"))


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_kohya_schema_is_the_one_in_sd_scripts():
    """The key lists are kohya's ConfigSanitizer schemas (library/config_util.py) for train_network.py."""
    assert len(DATASET_KEYS) == 11 and len(SUBSET_KEYS) == 23 and len(SUBSET_ONLY_KEYS) == 5
    assert len(KOHYA_KEYS) == 38  # resize_interpolation is both a dataset and a subset key
    assert {"caption_dropout_rate", "random_crop", "color_aug", "alpha_mask", "caption_prefix",
            "keep_tokens_separator", "validation_split", "conditioning_data_dir"} <= KOHYA_KEYS


def test_every_kohya_key_is_implemented_or_refused():
    fields = {f.name for cls in (DatasetConfig, SubsetConfig) for f in dataclasses.fields(cls)}
    implemented = KOHYA_KEYS & fields
    assert implemented | set(REFUSED) == KOHYA_KEYS
    assert not implemented & set(REFUSED)
    assert set(REFUSED) == {"face_crop_aug_range", "custom_attributes", "cache_info", "metadata_file",
                            "network_multiplier"}


# One test per refused key: a non-default value is one error naming the key and why.
REFUSED_CASES = {
    "face_crop_aug_range": ("face_crop_aug_range = [2.0, 4.0]", "detect_face_rotate.py"),
    "custom_attributes": ("custom_attributes = { weight = 2 }", "custom kohya training code"),
    "cache_info": ("cache_info = true", "metadata_cache.json"),
    "metadata_file": ('metadata_file = "meta.json"', "beside its image"),
    "network_multiplier": ("network_multiplier = 0.5", "trains every dataset at 1.0"),
}


def _refused(tmp_path, key):
    line, reason = REFUSED_CASES[key]
    level = "subset" if key in SUBSET_KEYS + SUBSET_ONLY_KEYS else "dataset"
    dataset_line, subset_line = (line, "") if level == "dataset" else ("", line)
    text = f'[[datasets]]\nresolution = 64\n{dataset_line}\n[[datasets.subsets]]\nimage_dir = "a"\n{subset_line}\n'
    message = error_of(load_kohya, tmp_path, text)
    where = "datasets[0]." if level == "dataset" else "datasets[0].subsets[0]."
    assert message.startswith(f"{tmp_path / 'dataset.toml'}: {where}{key} is not supported by lora-offset: ")
    assert reason in message
    return message


def test_refused_face_crop_aug_range(tmp_path):
    _refused(tmp_path, "face_crop_aug_range")


def test_refused_custom_attributes(tmp_path):
    _refused(tmp_path, "custom_attributes")


def test_refused_cache_info(tmp_path):
    _refused(tmp_path, "cache_info")


def test_refused_metadata_file(tmp_path):
    _refused(tmp_path, "metadata_file")


def test_refused_network_multiplier(tmp_path):
    _refused(tmp_path, "network_multiplier")


def test_refused_keys_at_kohyas_defaults_are_the_no_ops_they_are(tmp_path):
    config = load_kohya(tmp_path, """
[general]
cache_info = false
network_multiplier = 1.0
[[datasets]]
resolution = 64
custom_attributes = {}
[[datasets.subsets]]
image_dir = "a"
""")
    assert config.dataset.resolution == 64


def test_refused_keys_in_the_native_config_give_the_same_reason(tmp_path):
    text = MODEL + '[dataset]\nresolution = 64\n[[dataset.subsets]]\nimage_dir = "a"\nface_crop_aug_range = [1.0, 2.0]\n'
    message = error_of(load_config, write(tmp_path, text, "c.toml"))
    assert "dataset.subsets[0].face_crop_aug_range is not supported by lora-offset: " in message
    text = MODEL + '[[datasets]]\nnetwork_multiplier = 2.0\n[[datasets.subsets]]\nimage_dir = "a"\n'
    assert "datasets[0].network_multiplier is not supported" in error_of(load_config, write(tmp_path, text, "d.toml"))


def test_two_datasets_each_with_its_resolution_batch_size_and_buckets(tmp_path):
    config = load_kohya(tmp_path, """
[general]
shuffle_caption = true
caption_extension = ".caption"
resize_interpolation = "bicubic"
batch_size = 3

[[datasets]]
resolution = 512
enable_bucket = true
validation_split = 0.25
validation_seed = 7
flip_aug = true
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 2
  random_crop = true
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "dog"
  shuffle_caption = false

[[datasets]]
resolution = [768, 512]
batch_size = 1
  [[datasets.subsets]]
  image_dir = "b"
  alpha_mask = true
  resize_interpolation = "area"
""", MODEL + "[training]\ncache_latents = false\n")
    first, second = config.datasets
    assert (first.resolution, first.batch_size, first.enable_bucket) == (512, 3, True)
    assert (first.validation_split, first.validation_seed) == (0.25, 7)
    assert (second.resolution, second.batch_size, second.enable_bucket, second.validation_split) == (
        [768, 512], 1, False, 0.0)
    a, reg = first.subsets
    assert (a.num_repeats, a.random_crop, a.flip_aug, a.shuffle_caption, a.caption_extension) == (
        2, True, True, True, ".caption")
    assert (reg.is_reg, reg.shuffle_caption, reg.flip_aug, reg.resize_interpolation) == (True, False, True, "bicubic")
    (b,) = second.subsets
    assert (b.alpha_mask, b.resize_interpolation, b.flip_aug, b.shuffle_caption) == (True, "area", False, True)
    assert config.dataset is first
    # the native config says the same with [[datasets]]: to_dict round-trips
    assert Config.from_dict(config.to_dict()) == config


def test_caption_keys_of_the_recipe_sibling_are_the_same_keys(tmp_path):
    config = load_kohya(tmp_path, """
[general]
caption_dropout_rate = 0.1
caption_tag_dropout_rate = 0.2
keep_tokens_separator = "|||"
[[datasets]]
caption_prefix = "photo of"
[[datasets.subsets]]
image_dir = "a"
caption_suffix = "4k"
caption_dropout_every_n_epochs = 3
""")
    s = config.dataset.subsets[0]
    assert (s.caption_dropout_rate, s.caption_tag_dropout_rate, s.keep_tokens_separator, s.caption_prefix,
            s.caption_suffix, s.caption_dropout_every_n_epochs) == (0.1, 0.2, "|||", "photo of", "4k", 3)


def test_subset_only_keys_belong_in_a_subset(tmp_path):
    for key, value in (("image_dir", '"a"'), ("is_reg", "true"), ("alpha_mask", "true")):
        message = error_of(load_kohya, tmp_path, f'[general]\n{key} = {value}\n[[datasets]]\n'
                                                 '[[datasets.subsets]]\nimage_dir = "a"\n')
        assert message.endswith(f"'general.{key}' belongs to a subset (kohya's schema): put it in [[datasets.subsets]]")


def test_kohya_schema_errors(tmp_path):
    assert "did you mean 'datasets.subsets.random_crop'?" in error_of(
        load_kohya, tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nrandom_crp = true\n')
    assert "expected one or more [[datasets]]" in error_of(load_kohya, tmp_path, "[general]\nresolution = 64\n")
    assert "resize_interpolation must be one of 'lanczos' | 'nearest'" in error_of(
        load_kohya, tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nresize_interpolation = "sinc"\n')
    assert "datasets[1].resolution must be a positive multiple of 64, got [512, 500]" in error_of(
        load_kohya, tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
                              '[[datasets]]\nresolution = [512, 500]\n[[datasets.subsets]]\nimage_dir = "b"\n')
    assert "datasets[0].validation_split must be in [0, 1), got 1.0" in error_of(
        load_kohya, tmp_path, '[[datasets]]\nvalidation_split = 1.0\n[[datasets.subsets]]\nimage_dir = "a"\n'
                              '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "b"\n')


def test_augmentations_that_change_every_use_refuse_a_latent_cache(tmp_path):
    for key in ("random_crop", "color_aug"):
        text = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n{key} = true\n'
        message = error_of(load_kohya, tmp_path, text)
        assert f"dataset.subsets[0].{key} = true changes the image at every use, so its latents cannot be cached: " \
               "set training.cache_latents = false" in message
        config = load_kohya(tmp_path, text, MODEL + "[training]\ncache_latents = false\n")
        assert getattr(config.dataset.subsets[0], key) is True


def test_mask_settings(tmp_path):
    subset = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
    assert "conditioning_data_dir (mask images) needs training.masked_loss = true" in error_of(
        load_kohya, tmp_path, subset + 'conditioning_data_dir = "m"\n')
    assert "training.masked_loss = true, but no subset has conditioning_data_dir" in error_of(
        load_kohya, tmp_path, subset, MODEL + "[training]\nmasked_loss = true\n")
    assert "has both alpha_mask = true and conditioning_data_dir" in error_of(
        load_kohya, tmp_path, subset + 'conditioning_data_dir = "m"\nalpha_mask = true\n',
        MODEL + "[training]\nmasked_loss = true\n")
    config = load_kohya(tmp_path, subset + 'conditioning_data_dir = "m"\n', MODEL + "[training]\nmasked_loss = true\n")
    assert config.dataset.subsets[0].conditioning_data_dir == "m"
    assert "validate_every_n_steps is set, but no dataset has validation_split > 0" in error_of(
        load_kohya, tmp_path, subset, MODEL + "[training]\nvalidate_every_n_steps = 5\n")


def test_native_datasets_and_set_overrides(tmp_path):
    text = MODEL + """
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "a"
[[datasets]]
resolution = 128
batch_size = 2
  [[datasets.subsets]]
  image_dir = "b"
"""
    path = write(tmp_path, text, "c.toml")
    config = load_config(path, ["dataset.enable_bucket=true"])
    assert [(d.resolution, d.batch_size, d.enable_bucket) for d in config.datasets] == [(64, 1, True), (128, 2, True)]
    assert "has both [dataset] and [[datasets]]" in error_of(
        load_config, write(tmp_path, text + "[dataset]\nresolution = 64\n", "both.toml"))
    assert "has a [datasets] section and --dataset-config" in error_of(
        load_config, path, dataset_config=write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n',
                                                "k.toml"))
    assert "datasets[1].subsets[0].num_repeats must be >= 1, got 0" in error_of(
        load_config, write(tmp_path, text.replace('image_dir = "b"', 'image_dir = "b"\n  num_repeats = 0'), "r.toml"))


def test_the_example_kohya_dataset_file_loads_as_is():
    root = Path(__file__).resolve().parents[1] / "examples"
    config = load_config(root / "train_only.toml", dataset_config=root / "dataset_kohya.toml")
    (dataset,) = config.datasets
    assert [(s.num_repeats, s.class_tokens, s.is_reg, s.shuffle_caption) for s in dataset.subsets] == [
        (10, "sks dog", False, True), (1, "dog", True, True)]
