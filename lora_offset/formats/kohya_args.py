"""kohya's `train_network.py` command line and its `--config_file`, read as kohya reads them. Pure: no I/O.

The command line is parsed by an argparse parser with train_network.py's own options
(lora_offset.formats.kohya_options: names, types, defaults, nargs, choices), so `--opt=value`,
`--opt value`, store-true flags, `--network_args "k=v" …` and prefix abbreviations behave as in kohya.
`--config_file F` (".toml" appended when missing) is kohya's `read_config_from_file`: a TOML whose
sections are ignored (their keys are merged), whose keys are the argparse names, and whose values the
command line overrides. `--output_config` writes the command line back as such a file: the values
that differ from kohya's defaults, as kohya does (`config_file`, `output_config` and `wandb_api_key`
left out). Unlike kohya, an unknown option or config key is not ignored: it is listed, with every
other option lora-offset cannot honour, in one error (lora_offset.formats.kohya_recipe).
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml

from lora_offset.errors import UserError
from lora_offset.formats.kohya_options import FAMILY_FLAGS, FAMILY_OPTIONS, OPTIONS, Option, int_or_float

PRINT_CONFIG = "--print-config"  # lora-offset's own flag: print the lora-offset TOML instead of training
NOT_WRITTEN = ("config_file", "output_config", "wandb_api_key")  # kohya's read_config_from_file drops these


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit
        raise UserError(f"kohya arguments: {message}")


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """train_network.py's parser. `with_defaults=False`: options that are not given stay absent."""
    parser = _Parser(prog="lora-offset kohya", allow_abbrev=True,
                     description="train with kohya sd-scripts' train_network.py arguments (SD 1.x LoRA); "
                                 f"{PRINT_CONFIG} prints the lora-offset TOML of the recipe instead of training",
                     argument_default=None if with_defaults else argparse.SUPPRESS)
    for name, option in OPTIONS.items():
        kwargs: dict[str, Any] = {"action": "store_true"} if option.type is None else {"type": option.type}
        if option.nargs is not None:
            kwargs["nargs"] = option.nargs
        if option.choices is not None:
            kwargs["choices"] = list(option.choices)
        if with_defaults:
            kwargs["default"] = option.default
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def defaults() -> dict[str, Any]:
    return {name: option.default for name, option in OPTIONS.items()}


@dataclass
class CommandLine:
    values: dict[str, Any]  # the options given on the command line (parsed and typed)
    print_config: bool = False
    problems: list[str] = field(default_factory=list)  # unknown options, other families' options


def parse_command_line(argv: list[str]) -> CommandLine:
    """The options `argv` gives (types checked by argparse, as kohya's); unknown ones become problems."""
    argv = list(argv)
    print_config = PRINT_CONFIG in argv
    argv = [a for a in argv if a != PRINT_CONFIG]
    namespace, extras = build_parser(with_defaults=False).parse_known_args(argv)
    problems = []
    after_unknown = False  # the tokens after an unknown option are its values
    for token in extras:
        if token.startswith("-") and not _is_number(token):
            problems.append(unknown_option(token.lstrip("-").partition("=")[0], "--"))
            after_unknown = True
        elif not after_unknown:
            problems.append(f"{token!r}: train_network.py takes no positional arguments (its options start with --)")
    return CommandLine(vars(namespace), print_config, problems)


def unknown_option(name: str, dashes: str = "") -> str:
    """Why `name` is not an option here: another model family's, or unknown (with the closest option)."""
    if name in FAMILY_OPTIONS:
        return f"{dashes}{name}: an option of {FAMILY_OPTIONS[name]}; lora-offset trains Stable Diffusion 1.x"
    close = difflib.get_close_matches(name, list(OPTIONS), n=1, cutoff=0.6)
    hint = f" (did you mean {dashes}{close[0]}?)" if close else ""
    return f"{dashes}{name}: not a train_network.py option{hint}"


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def config_file_path(name: str) -> Path:
    """kohya's rule: ".toml" is appended to a --config_file name that does not end with it."""
    return Path(name if name.endswith(".toml") else name + ".toml")


def flatten_config_file(data: dict) -> dict[str, Any]:
    """kohya's read_config_from_file: the keys of every section (and top-level keys) in one table."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def merge_config_file(command_line: dict[str, Any], data: dict, source: str) -> tuple[dict, dict, list[str]]:
    """(every option's value, {option: where it was set}, problems): kohya's defaults, then the config
    file's keys, then the command line (kohya: `parser.parse_args(namespace=config_args)`)."""
    values = defaults()
    given: dict[str, str] = {}
    problems = []
    for key, value in flatten_config_file(data).items():
        if key in ("config_file", "output_config"):
            continue
        if key not in OPTIONS:
            problems.append(f"{source}: {unknown_option(key)}")
            continue
        try:
            values[key] = check_value(key, value, OPTIONS[key])
        except ValueError as e:
            problems.append(f"{source}: {key} {e}")
            continue
        given[key] = source
    for key, value in command_line.items():
        values[key], given[key] = value, "the command line"
    return values, given, problems


def command_line_values(command_line: dict[str, Any]) -> tuple[dict, dict]:
    """(every option's value, {option: where}) without a config file."""
    return {**defaults(), **command_line}, {key: "the command line" for key in command_line}


def check_value(key: str, value: Any, option: Option) -> Any:
    """A config-file value as the option's type (TOML has its own types); ValueError(why) when it does not fit."""
    def bad(expected: str) -> ValueError:
        return ValueError(f"must be {expected}, got {type(value).__name__} {value!r}")

    if option.nargs == "*":
        items = value if isinstance(value, list) else [value]
        if option.type is float:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                raise bad("a number or an array of numbers")
            return [float(v) for v in items]
        if not all(isinstance(v, str) for v in items):
            raise bad('an array of strings, e.g. ["conv_dim=4", "conv_alpha=1"]')
        return list(items)
    if option.type is None:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif option.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif option.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif option.type is int_or_float:
        if isinstance(value, str):
            try:
                value = int_or_float(value)
            except argparse.ArgumentTypeError as e:
                raise ValueError(str(e)) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number of steps or a fraction")
    elif key == "resolution":  # kohya's str "512" or "512,768"; the kohya_ss GUI also writes numbers
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        elif not isinstance(value, str):
            raise bad('a string such as "512" or "512,768"')
    elif not isinstance(value, str):
        raise bad("a string")
    if option.choices is not None and value not in option.choices:
        raise ValueError(f"must be one of {', '.join(str(c) for c in option.choices if c is not None)}, "
                         f"got {value!r}")
    return value


def output_config(command_line: dict[str, Any]) -> str:
    """kohya's --output_config file of a command line: the non-default values, Paths as strings."""
    out = {}
    for key, value in {**defaults(), **command_line}.items():
        if key in NOT_WRITTEN or value == OPTIONS[key].default:
            continue
        out[key] = str(value) if isinstance(value, Path) else value
    return toml.dumps(out)


def family_of_flags(values: dict[str, Any]) -> list[str]:
    """Problems for set flags that mean another model family (--v2)."""
    return [f"--{name}: {family}" for name, family in FAMILY_FLAGS.items() if values[name]]
