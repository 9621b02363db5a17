"""`lora-offset kohya ARGS…`: train with kohya sd-scripts' `train_network.py` command line, unchanged.

    lora-offset kohya --pretrained_model_name_or_path=model --dataset_config=data.toml --output_dir=out \\
        --network_module=networks.lora --network_dim=16 --network_alpha=1 --learning_rate=1e-4 …
    accelerate launch -m lora_offset kohya …          (several processes, as `accelerate launch train_network.py …`)
    lora-offset kohya --config_file recipe.toml [ARGS…]   (kohya's config file; the command line overrides it)
    lora-offset kohya ARGS… --config_file recipe.toml --output_config   (write the recipe as that file, as kohya)
    lora-offset kohya ARGS… --print-config             (print the lora-offset TOML of the recipe; no training)

Reading (formats/kohya_args.py), translating (formats/kohya_recipe.py) and the trainer
(training/train.py) are the stages; this module reads the files they name and reports.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from pathlib import Path

import toml

from lora_offset.errors import UserError

log = logging.getLogger("lora_offset")
PARSES_OWN_ARGUMENTS = True  # lora_offset.cli hands over the words after "kohya" as they are
SOURCE = "kohya arguments"


def add_arguments(parser) -> None:
    parser.add_argument("arguments", nargs=argparse.REMAINDER,
                        help="train_network.py's arguments (lora-offset kohya --help lists them)")


def run(args) -> int:
    from lora_offset.config import read_toml
    from lora_offset.formats import kohya_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command_line = kohya_args.parse_command_line(args.arguments)
    problems = list(command_line.problems)
    config_file = command_line.values.get("config_file")
    if config_file and command_line.values.get("output_config"):
        return write_output_config(command_line, kohya_args.config_file_path(config_file), problems)
    if command_line.values.get("output_config"):
        raise UserError("--output_config writes the recipe to --config_file: give --config_file FILE too")
    if config_file:
        path = kohya_args.config_file_path(config_file)
        values, given, file_problems = kohya_args.merge_config_file(command_line.values, read_toml(path), str(path))
        problems += file_problems
    else:
        values, given = kohya_args.command_line_values(command_line.values)
    recipe = translate(values, given, problems)
    for note in recipe.notes:
        log.info("%s", note)
    config = build_config(recipe)
    if command_line.print_config:
        sys.stdout.write(toml.dumps(config.to_dict()))
        return 0
    from lora_offset.training.train import run_training

    again = "lora-offset kohya <the same arguments> --resume latest"
    return run_training(config, recipe.resume, again=again)


def translate(values: dict, given: dict, problems: list[str]):
    """The recipe, every problem of the arguments, the files and the translation raised as one error."""
    from lora_offset.config import read_toml
    from lora_offset.formats.kohya_recipe import to_config

    dataset_config, source = None, "--dataset_config"
    if values.get("dataset_config") is not None:
        source = str(values["dataset_config"])
        dataset_config = read_toml(Path(values["dataset_config"]))
    recipe = to_config(values, given, seed=random.randint(0, 2**32), dataset_config=dataset_config,
                       dataset_source=source, train_subfolders=subfolders(values.get("train_data_dir")),
                       reg_subfolders=subfolders(values.get("reg_data_dir")))
    problems = problems + recipe.problems
    if problems:
        count = f"{len(problems)} of these arguments cannot" if len(problems) > 1 else "this argument cannot"
        raise UserError(f"{SOURCE}: {count} be honoured by lora-offset:\n  " + "\n  ".join(problems))
    return recipe


def subfolders(root: str | None) -> list[str] | None:
    if not root:
        return None
    folder = Path(root)
    if not folder.is_dir():
        raise UserError(f"--train_data_dir / --reg_data_dir {root!r} is not a folder")
    return [p.name for p in folder.iterdir() if p.is_dir()]


def build_config(recipe):
    """lora_offset's Config of the recipe; a config error also names the kohya option behind the key."""
    from lora_offset.config import Config

    try:
        return Config.from_dict(recipe.config, source=SOURCE)
    except UserError as e:
        raise UserError(f"{e}{behind(str(e))}") from None


# lora-offset keys -> the kohya options that set them (for errors about a translated value)
KEY_ORIGINS = {
    "model.pretrained": "--pretrained_model_name_or_path", "model.vae": "--vae",
    "network.rank": "--network_dim", "network.alpha": "--network_alpha", "network.dropout": "--network_dropout",
    "network.conv_rank": "--network_args conv_dim", "network.conv_alpha": "--network_args conv_alpha",
    "network.loraplus_lr_ratio": "--network_args loraplus_lr_ratio", "network.weights": "--network_weights",
    "network.scale_weight_norms": "--scale_weight_norms", "network.rank_dropout": "--network_args rank_dropout",
    "network.module_dropout": "--network_args module_dropout", "network.preset": "--network_args preset",
    "network.block_dims": "--network_args block_dims", "network.block_alphas": "--network_args block_alphas",
    "network.conv_block_dims": "--network_args conv_block_dims",
    "network.conv_block_alphas": "--network_args conv_block_alphas",
    "network.down_lr_weight": "--network_args down_lr_weight", "network.up_lr_weight": "--network_args up_lr_weight",
    "network.lokr_factor": "--network_args factor", "network.type": "--network_args algo",
    "noise.offset": "--noise_offset", "noise.adaptive_offset": "--adaptive_noise_scale",
    "noise.pyramid_iterations": "--multires_noise_iterations", "noise.pyramid_discount": "--multires_noise_discount",
    "noise.input_perturbation": "--ip_noise_gamma", "noise.zero_terminal_snr": "--zero_terminal_snr",
    "noise.min_snr_gamma": "--min_snr_gamma", "noise.min_timestep": "--min_timestep",
    "noise.max_timestep": "--max_timestep", "training.max_steps": "--max_train_steps",
    "training.max_train_epochs": "--max_train_epochs", "training.learning_rate": "--learning_rate / --unet_lr",
    "training.text_encoder_lr": "--text_encoder_lr", "training.lr_scheduler": "--lr_scheduler",
    "training.lr_warmup_steps": "--lr_warmup_steps", "training.optimizer_args": "--optimizer_args",
    "training.optimizer": "--optimizer_type", "training.output_name": "--output_name",
    "training.sample_prompts": "--sample_prompts", "training.sample_sampler": "--sample_sampler",
    "training.clip_skip": "--clip_skip", "training.huber_c": "--huber_c",
    "training.gradient_accumulation_steps": "--gradient_accumulation_steps",
}


def behind(message: str) -> str:
    keys = [key for key in KEY_ORIGINS if re.search(rf"\b{re.escape(key)}\b", message)]
    return f" (set by {', '.join(KEY_ORIGINS[k] for k in keys)})" if keys else ""


def write_output_config(command_line, path: Path, problems: list[str]) -> int:
    """kohya's --output_config: the command line's non-default values as a config file, which must not exist yet."""
    from lora_offset.fileio import atomic_write_text
    from lora_offset.formats import kohya_args

    if path.exists():
        raise UserError(f"--output_config: {path} exists already; kohya refuses to overwrite it too (remove it "
                        "or give another --config_file)")
    values, given = kohya_args.command_line_values(
        {k: v for k, v in command_line.values.items() if k not in ("config_file", "output_config")})
    build_config(translate(values, given, problems))  # a recipe that cannot run here is not written
    atomic_write_text(path, kohya_args.output_config(command_line.values))
    log.info("saved the recipe as %s (run it with: lora-offset kohya --config_file %s)", path, path)
    return 0
