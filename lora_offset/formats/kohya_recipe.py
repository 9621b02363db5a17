"""A kohya `train_network.py` recipe (every option's value) as lora-offset's config table. Pure: no I/O.

Where an option is absent, kohya's default applies, not lora-offset's: the text encoder trains
unless --network_train_unet_only, no offset noise unless --noise_offset, learning rate 2e-6, AdamW,
the constant schedule, fp32 saves, no gradient checkpointing, no latent cache, no resumable state
without --save_state, output name "last", captions in ".caption" files, a random seed. The dataset
is kohya's too: a --dataset_config file (lora_offset.formats.kohya_dataset) or the `N_tokens`
subfolders of --train_data_dir / --reg_data_dir, with the command line's dataset options as the
values no level of the file sets (kohya's `BlueprintGenerator` fallbacks).

`to_config` returns the table (for lora_offset.config.Config.from_dict), the info lines, and the
problems: every option lora-offset cannot honour, each with its reason, so that the command raises
them together in one error.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from lora_offset.errors import UserError
from lora_offset.formats.kohya_args import family_of_flags
from lora_offset.formats.kohya_dataset import REFUSED as DATASET_REFUSED
from lora_offset.formats.kohya_dataset import kohya_datasets
from lora_offset.formats.kohya_network_args import network_table
from lora_offset.formats.kohya_options import ACCEPTED, NO_EFFECT, OPTIONS, REFUSED, is_set

# kohya --optimizer_type (lower-cased, as kohya compares it) -> training.optimizer
OPTIMIZER_NAMES = {"adamw8bit": "adamw8bit", "adamw": "adamw", "pagedadamw8bit": "pagedadamw8bit",
                   "lion8bit": "lion8bit", "lion": "lion", "prodigy": "prodigy", "adafactor": "adafactor",
                   "adamwschedulefree": "adamw_schedulefree"}
# kohya passes no weight_decay unless --optimizer_args has one: each class's own default applies
# (tests/test_kohya_command.py checks these against the classes' signatures).
WEIGHT_DECAY_DEFAULTS = {"adamw8bit": 0.01, "adamw": 0.01, "pagedadamw8bit": 0.01, "lion8bit": 0.0, "lion": 0.0,
                         "prodigy": 0.0, "adafactor": 0.0, "adamw_schedulefree": 0.0}
# Command-line options that are dataset or subset keys of kohya's dataset config (config_util's
# ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME renames two): the lowest level of the cascade.
DATASET_FALLBACKS = {
    "train_batch_size": "batch_size", "dataset_repeats": "num_repeats", "resolution": "resolution",
    **{name: name for name in (
        "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
        "validation_seed", "validation_split", "resize_interpolation", "shuffle_caption", "caption_separator",
        "caption_extension", "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
        "caption_prefix", "caption_suffix", "color_aug", "flip_aug", "random_crop", "caption_dropout_rate",
        "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step",
        "alpha_mask")},
}
OFFSET_HINT = ("offset noise is off (kohya's default, no --noise_offset): add --noise_offset=0.1 to train with it "
               "(lora-offset's default)")


@dataclass
class Recipe:
    config: dict[str, Any]  # lora-offset's config table
    resume: str | None = None  # --resume: latest | a state folder | a state file
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    options_read: set[str] = field(default_factory=set)  # the options the translation looked at


class _Values(dict):
    """The recipe's values; records which options the translation read (every supported one must be)."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def to_config(values: dict[str, Any], given: dict[str, str], *, seed: int, dataset_config: dict | None = None,
              dataset_source: str = "--dataset_config", train_subfolders: list[str] | None = None,
              reg_subfolders: list[str] | None = None) -> Recipe:
    """The lora-offset config of a kohya recipe. `values`: every option (kohya's defaults filled in);
    `given`: {option: where it was set}; `seed`: the seed when --seed is absent (kohya draws one);
    `dataset_config`: the --dataset_config file's table; `*_subfolders`: the names of the folders in
    --train_data_dir / --reg_data_dir (used without a dataset config)."""
    v = _Values(values)
    recipe = Recipe({})
    recipe.problems += family_of_flags(v) + _refused(values, given)
    recipe.notes += [f"--{name}: accepted, no effect here: {why}" for name, why in NO_EFFECT.items()
                     if name in given and not _is_refused_value(name, values[name])]
    _check_required(v, recipe)
    network = network_table(v["network_module"], v["network_dim"], v["network_alpha"], v["network_dropout"],
                            v["network_args"], train_text_encoder=not v["network_train_unet_only"])
    recipe.notes += network.notes
    recipe.problems += network.problems
    network.table.update(weights=v["network_weights"], dim_from_weights=v["dim_from_weights"],
                         scale_weight_norms=v["scale_weight_norms"] or None)  # kohya: 0 / unset = off
    recipe.config = {"model": _model(v), "network": network.table, "noise": _noise(v, recipe),
                     "training": _training(v, recipe, seed)}
    recipe.config["datasets"] = _datasets(v, recipe, dataset_config, dataset_source, train_subfolders, reg_subfolders)
    recipe.resume = v["resume"]
    recipe.config = _drop_none(recipe.config)
    recipe.options_read = v.read
    return recipe


def _is_refused_value(name: str, value: Any) -> bool:
    return name in REFUSED and is_set(value, OPTIONS[name].default) and value not in ACCEPTED.get(name, ())


def _refused(values: dict, given: dict) -> list[str]:
    out = [f"--{name}: {REFUSED[name]}" for name in OPTIONS if name in given and _is_refused_value(name, values[name])]
    for name in ("cache_info", "face_crop_aug_range"):  # kohya's dataset keys that lora-offset refuses
        if name in given and is_set(values[name], OPTIONS[name].default):
            out.append(f"--{name}: {DATASET_REFUSED[name][1]}")
    return out


def _check_required(v: _Values, recipe: Recipe) -> None:
    for name in ("pretrained_model_name_or_path", "output_dir"):
        if not v[name]:
            recipe.problems.append(f"--{name} is required (kohya fails without it too)")
    if v["adaptive_noise_scale"] is not None and v["noise_offset"] is None:
        recipe.problems.append("--adaptive_noise_scale needs --noise_offset (kohya refuses it alone too)")


def _model(v: _Values) -> dict:
    return {"pretrained": v["pretrained_model_name_or_path"],
            "prediction_type": "v_prediction" if v["v_parameterization"] else "epsilon",
            "vae": v["vae"],
            "base_precision": "fp8" if v["fp8_base"] or v["fp8_base_unet"] else "auto"}


def _noise(v: _Values, recipe: Recipe) -> dict:
    offset = v["noise_offset"] or 0.0
    if offset == 0:
        recipe.notes.append(OFFSET_HINT)
    return {"offset": offset,
            "adaptive_offset": v["adaptive_noise_scale"] or 0.0,
            "offset_random_strength": v["noise_offset_random_strength"],
            "pyramid_iterations": v["multires_noise_iterations"] or 0,
            "pyramid_discount": v["multires_noise_discount"],
            "input_perturbation": v["ip_noise_gamma"] or 0.0,
            "zero_terminal_snr": v["zero_terminal_snr"],
            "min_snr_gamma": v["min_snr_gamma"] or 0.0,
            "min_timestep": v["min_timestep"] or 0,
            "max_timestep": v["max_timestep"]}


def _training(v: _Values, recipe: Recipe, seed: int) -> dict:
    optimizer, optimizer_args, weight_decay = _optimizer(v, recipe)
    te_lr = v["text_encoder_lr"]
    te_lr = te_lr[0] if isinstance(te_lr, list) and te_lr else (None if isinstance(te_lr, list) else te_lr)
    epochs = v["max_train_epochs"]
    save_every_steps = v["save_every_n_steps"] or 0
    log_with = v["log_with"] or ("tensorboard" if v["logging_dir"] else "none")  # kohya logs only when asked
    if v["lr_scheduler"] == "constant" and v["lr_warmup_steps"]:
        recipe.problems.append("--lr_warmup_steps with --lr_scheduler=constant: kohya refuses it too (\"constant does "
                               "not require num_warmup_steps\"); use --lr_scheduler=constant_with_warmup")
    if v["save_state"]:
        recipe.notes.append("--save_state: a resumable state every "
                            f"{save_every_steps or 100} steps (lora-offset's states are step-based; the last 2 kept)")
    return {
        "output_dir": v["output_dir"],
        "output_name": v["output_name"] or "last",
        "max_steps": None if epochs else v["max_train_steps"],  # kohya: epochs win over steps
        "max_train_epochs": epochs,
        "learning_rate": v["unet_lr"] if v["unet_lr"] is not None else v["learning_rate"],
        "text_encoder_lr": te_lr if te_lr is not None else v["learning_rate"],
        "lr_scheduler": v["lr_scheduler"],
        "lr_warmup_steps": v["lr_warmup_steps"],
        "lr_scheduler_num_cycles": v["lr_scheduler_num_cycles"],
        "lr_scheduler_power": float(v["lr_scheduler_power"]),
        "gradient_accumulation_steps": v["gradient_accumulation_steps"],
        "mixed_precision": v["mixed_precision"],
        "clip_skip": v["clip_skip"] or 1,
        "max_token_length": v["max_token_length"] or 75,
        "optimizer": optimizer,
        "optimizer_args": optimizer_args,
        "weight_decay": weight_decay,
        "max_grad_norm": v["max_grad_norm"],
        "gradient_checkpointing": v["gradient_checkpointing"],
        "seed": v["seed"] if v["seed"] is not None else seed,
        "save_every_steps": save_every_steps,
        "save_every_n_epochs": v["save_every_n_epochs"] or 0,
        "save_last_n_steps": v["save_last_n_steps"] or 0,
        "save_last_n_epochs": v["save_last_n_epochs"] or 0,
        "save_state_every_steps": (save_every_steps or 100) if v["save_state"] else 0,
        "sample_every_steps": max(v["sample_every_n_steps"] or 0, 0),
        "sample_every_n_epochs": max(v["sample_every_n_epochs"] or 0, 0),
        "sample_at_first": v["sample_at_first"],
        "sample_prompts": v["sample_prompts"] or [],
        "sample_sampler": v["sample_sampler"],
        "save_precision": {None: "fp32", "float": "fp32"}.get(v["save_precision"], v["save_precision"]),
        "prior_loss_weight": v["prior_loss_weight"],
        "loss_type": v["loss_type"],
        "huber_c": v["huber_c"],
        "huber_schedule": v["huber_schedule"],
        "debiased_estimation": v["debiased_estimation_loss"],
        "masked_loss": v["masked_loss"],
        "validate_every_n_steps": v["validate_every_n_steps"] or 0,
        # kohya: --cache_latents_to_disk turns --cache_latents on
        "cache_latents": v["cache_latents"] or v["cache_latents_to_disk"],
        "cache_latents_to_disk": v["cache_latents_to_disk"],
        "logging_dir": v["logging_dir"],
        "log_with": log_with,
        "wandb_run_name": v["wandb_run_name"],
        "torch_compile": v["torch_compile"],
    }


def _optimizer(v: _Values, recipe: Recipe) -> tuple[str, dict, float]:
    """(training.optimizer, training.optimizer_args, training.weight_decay) of kohya's optimizer options."""
    kind = v["optimizer_type"] or ""
    if v["use_8bit_adam"] or v["use_lion_optimizer"]:
        flag = "--use_8bit_adam" if v["use_8bit_adam"] else "--use_lion_optimizer"
        if kind or (v["use_8bit_adam"] and v["use_lion_optimizer"]):
            recipe.problems.append(f"{flag}: give it or --optimizer_type, not both (kohya refuses this too)")
        kind = "AdamW8bit" if v["use_8bit_adam"] else "Lion"
    name = OPTIMIZER_NAMES.get((kind or "AdamW").lower())
    if name is None:
        names = ", ".join(("AdamW8bit", "AdamW", "PagedAdamW8bit", "Lion8bit", "Lion", "Prodigy", "Adafactor",
                           "AdamWScheduleFree"))
        recipe.problems.append(f"--optimizer_type={kind}: not implemented; lora-offset has {names}")
        name = "adamw"
    args: dict[str, Any] = {}
    for item in v["optimizer_args"] or []:
        key, sep, raw = item.partition("=")
        try:
            if not sep:
                raise ValueError
            value = ast.literal_eval(raw)  # kohya's parsing: "betas=0.9,0.99" is a tuple
        except (ValueError, SyntaxError):
            recipe.problems.append(f"--optimizer_args {item!r}: expected key=value with a Python literal value, "
                                   "e.g. weight_decay=0.1 or betas=0.9,0.99")
            continue
        args[key.strip()] = list(value) if isinstance(value, tuple) else value
    weight_decay = args.pop("weight_decay", WEIGHT_DECAY_DEFAULTS[name])
    if name == "adafactor" and (args.get("relative_step", True) or args.get("warmup_init", False)):
        recipe.problems.append("--optimizer_type=Adafactor: kohya's default relative_step=True (forced by "
                               "warmup_init=True) makes Adafactor run its own schedule, which lora-offset does not "
                               "drive: add --optimizer_args relative_step=False and set --learning_rate")
    return name, args, float(weight_decay)


def _datasets(v: _Values, recipe: Recipe, dataset_config: dict | None, source: str,
              train_subfolders: list[str] | None, reg_subfolders: list[str] | None) -> list[dict]:
    """kohya's dataset: the dataset config, else the train/reg folders' subfolders, with the
    command line's dataset options as the lowest level."""
    fallback = {key: v[name] for name, key in DATASET_FALLBACKS.items() if v[name] is not None}
    fallback["caption_extension"] = v["caption_extention"] or fallback["caption_extension"]  # kohya's old spelling
    if "resolution" in fallback:
        fallback["resolution"] = _resolution(fallback["resolution"], recipe)
    if v["validation_seed"] is None:
        fallback.pop("validation_seed", None)
    if dataset_config is not None:
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir") if v[name] is not None]
        if ignored:
            recipe.notes.append(f"{', '.join(ignored)}: ignored because --dataset_config is given (as in kohya)")
        data = dataset_config
    else:
        if not v["train_data_dir"]:
            recipe.problems.append("no dataset: give --dataset_config (kohya's dataset TOML) or --train_data_dir")
            return [{}]
        subsets = (_folder_subsets(v["train_data_dir"], train_subfolders or [], False, recipe)
                   + _folder_subsets(v["reg_data_dir"], reg_subfolders or [], True, recipe))
        data = {"datasets": [{"subsets": subsets}]}
        source = "--train_data_dir"
    try:
        datasets = kohya_datasets(data, source, (), (), fallback=fallback)
    except UserError as e:  # names the key: one of the problems
        recipe.problems.append(str(e))
        return [{}]
    for d in datasets:
        if "resolution" not in d:
            recipe.problems.append("no resolution: give --resolution (e.g. 512 or 512,768) or resolution in the "
                                   "dataset config")
            break
    return datasets


def _resolution(value: Any, recipe: Recipe) -> Any:
    """kohya's --resolution "512" or "512,768" -> 512 or [512, 768]."""
    if not isinstance(value, str):
        return value
    try:
        sizes = [int(s) for s in value.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        recipe.problems.append(f"--resolution={value}: must be 'size' or 'width,height' (kohya's rule)")
        return None
    return sizes[0] if len(sizes) == 1 or sizes[0] == sizes[1] else sizes


def _folder_subsets(root: str | None, names: list[str], is_reg: bool, recipe: Recipe) -> list[dict]:
    """kohya's DreamBooth folders: `<repeats>_<class tokens>` subfolders become subsets (others are skipped)."""
    if root is None:
        return []
    subsets, skipped = [], []
    for name in sorted(names):
        repeats, _, tokens = name.partition("_")
        if repeats.isdigit() and int(repeats) >= 1:
            subsets.append({"image_dir": f"{root.rstrip('/')}/{name}", "num_repeats": int(repeats),
                            "is_reg": is_reg, "class_tokens": tokens})
        else:
            skipped.append(name)
    if skipped:
        recipe.notes.append(f"{root}: skipped folders not named <repeats>_<class tokens> (as kohya): "
                            f"{', '.join(skipped)}")
    if not subsets and not is_reg:
        recipe.problems.append(f"--train_data_dir={root}: no subfolder named like '10_sks dog' "
                               "(<repeats>_<class tokens>)")
    return subsets


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(x) for k, x in value.items() if x is not None}
    if isinstance(value, list):
        return [_drop_none(x) for x in value]
    return value
