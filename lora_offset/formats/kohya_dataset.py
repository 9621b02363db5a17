"""kohya's dataset-config TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`) as lora-offset datasets.

kohya sd-scripts' schema (library/config_util.py, `ConfigSanitizer`, as train_network.py uses it:
DreamBooth and fine-tuning styles, caption dropout, and with `--masked_loss` the ControlNet-style
`conditioning_data_dir`) has three levels. Dataset keys may be set in `[general]` or a
`[[datasets]]` table; subset keys may be set at any level and a more specific level wins; a few
keys belong to a subset only. Every key of that schema either means here what it means in kohya
(the same name in lora-offset's `[[datasets]]` / `[[datasets.subsets]]`) or is refused with one
error that names it and says why (`REFUSED`), never ignored. lora-offset's own dataset and subset
keys are accepted too. Each `[[datasets]]` becomes one lora-offset dataset: its own resolution,
batch size and buckets.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from lora_offset.errors import UserError

# kohya's DATASET_ASCENDABLE_SCHEMA: set in [general] or [[datasets]].
DATASET_KEYS = ("batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso",
                "min_bucket_reso", "validation_seed", "validation_split", "resolution", "network_multiplier",
                "resize_interpolation")
# kohya's SUBSET_ASCENDABLE, DO_SUBSET_ASCENDABLE and DB_SUBSET_ASCENDABLE schemas: any level.
SUBSET_KEYS = ("color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption",
               "keep_tokens", "keep_tokens_separator", "secondary_separator", "caption_separator", "enable_wildcard",
               "token_warmup_min", "token_warmup_step", "caption_prefix", "caption_suffix", "custom_attributes",
               "resize_interpolation", "caption_dropout_every_n_epochs", "caption_dropout_rate",
               "caption_tag_dropout_rate", "caption_extension", "class_tokens", "cache_info")
# kohya's *_SUBSET_DISTINCT schemas: a subset's own keys (DreamBooth, fine-tuning, ControlNet/masked_loss).
SUBSET_ONLY_KEYS = ("image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir")
KOHYA_KEYS = frozenset(DATASET_KEYS + SUBSET_KEYS + SUBSET_ONLY_KEYS)

_NO_DEFAULT = object()
# key -> (kohya's default, which is accepted as the no-op it is; why any other value is refused)
REFUSED: dict[str, tuple[Any, str]] = {
    "face_crop_aug_range": (_NO_DEFAULT, (
        "kohya crops around a face whose position its tools/detect_face_rotate.py writes into the file name, "
        "and only with enable_bucket = false; crop the images beforehand, or use random_crop")),
    "custom_attributes": ({}, (
        "it hands extra values to custom kohya training code, which lora-offset does not run; remove it")),
    "cache_info": (False, (
        "kohya then keeps image sizes and captions in metadata_cache.json and stops checking the images; "
        "lora-offset checks every image at each start (an unreadable one is skipped with a warning) and reads "
        "the captions fresh: remove the key")),
    "metadata_file": (_NO_DEFAULT, (
        "fine-tuning-style subsets take their captions from kohya's JSON metadata file "
        "(finetune/merge_captions_to_metadata.py); put each caption in a .txt file beside its image "
        "(kohya's DreamBooth style, image_dir + caption_extension) instead")),
    "network_multiplier": (1.0, (
        "training a dataset at another strength of the LoRA is not implemented; lora-offset trains every "
        "dataset at 1.0 (remove the key)")),
}


def refuse(table: dict, where: str, source: str) -> dict:
    """`table` without the refused keys that hold kohya's default (a no-op); an error for any other value."""
    out = {}
    for key, value in table.items():
        if key in REFUSED:
            default, reason = REFUSED[key]
            if default is _NO_DEFAULT or value != default:
                raise UserError(f"{source}: {where}{key} is not supported by lora-offset: {reason}")
            continue
        out[key] = value
    return out


def kohya_datasets(data: dict, source: str, native_dataset_keys: Iterable[str],
                   native_subset_keys: Iterable[str], fallback: dict | None = None) -> list[dict]:
    """kohya's dataset config `data` -> lora-offset dataset tables (`subsets` included), one per [[datasets]].

    `native_*_keys`: lora-offset's own dataset and subset keys (also accepted). Values cascade as in
    kohya: subset <- dataset <- general, and dataset <- general; `fallback` (kohya keys) is the level
    below [general]: kohya's train_network.py takes the command line's dataset options there.
    """
    dataset_keys = set(DATASET_KEYS) | set(native_dataset_keys)
    subset_keys = set(SUBSET_KEYS) | set(native_subset_keys)
    dataset_keys.discard("subsets")
    _check(data, {"general", "datasets"}, source, "")
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise UserError(f"{source}: [general] must be a table")
    general = refuse(general, "general.", source)
    _check(general, (dataset_keys | subset_keys) - set(SUBSET_ONLY_KEYS), source, "general.")
    general = {**(fallback or {}), **general}
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise UserError(f"{source}: expected one or more [[datasets]] tables, each with [[datasets.subsets]]")
    out = []
    for i, dataset in enumerate(datasets):
        where = f"datasets[{i}]."
        dataset = refuse(dataset, where, source)
        _check(dataset, ((dataset_keys | subset_keys) - set(SUBSET_ONLY_KEYS)) | {"subsets"}, source, "datasets.")
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise UserError(f"{source}: {where}subsets must be an array of tables ([[datasets.subsets]])")
        levels = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        table = {k: v for k, v in levels.items() if k in dataset_keys and k not in subset_keys}
        # resize_interpolation is a dataset key and a subset key in kohya: here each subset carries it.
        defaults = {k: v for k, v in levels.items() if k in subset_keys}
        table["subsets"] = []
        for j, subset in enumerate(subsets):
            subset = refuse(subset, f"{where}subsets[{j}].", source)
            _check(subset, subset_keys | set(SUBSET_ONLY_KEYS), source, "datasets.subsets.")
            table["subsets"].append({**defaults, **subset})
        out.append(table)
    return out


def _check(table: dict, valid: Iterable[str], source: str, prefix: str) -> None:
    valid = sorted(valid)
    for key in table:
        if key in valid:
            continue
        if key in SUBSET_ONLY_KEYS:
            raise UserError(f"{source}: '{prefix}{key}' belongs to a subset (kohya's schema): put it in "
                            "[[datasets.subsets]]")
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        raise UserError(f"{source}: unknown key '{prefix}{key}'{hint}")
