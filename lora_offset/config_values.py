"""A TOML value checked against a config field's type hint: the conversions and the error messages
(each naming the file and the key, and the closest valid key for a typo). Pure: no config classes."""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Literal

from lora_offset.errors import UserError


def check_keys(table: dict, valid: list[str], source: str, prefix: str) -> None:
    for key in table:
        if key not in valid:
            raise UserError(f"{source}: unknown key '{prefix}{key}'{suggest(key, valid, prefix)}")


def suggest(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + v for v in valid)}"


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # Optional[X], Optional[X | Y]
        arms = tuple(a for a in args if a is not type(None))
        return coerce(value, arms[0] if len(arms) == 1 else typing.Union[arms], key, source)
    if origin in (typing.Union, types.UnionType):  # X | Y: the first type the value is
        list_arms = [a for a in args if typing.get_origin(a) is list]
        if isinstance(value, list) and list_arms:
            return coerce(value, list_arms[0], key, source)  # its items' errors name the item
        for arm in args:
            try:
                return coerce(value, arm, key, source)
            except UserError:
                continue
        names = " or ".join(f"an array of {hint_name(typing.get_args(a)[0])}s" if typing.get_origin(a) is list
                            else f"a {hint_name(a)}" for a in args)
        raise UserError(f"{source}: {key} must be {names}, got {type_name(value)} {value!r}")
    if origin is Literal:
        if value not in args:
            choices = " | ".join(repr(a) for a in args)
            raise UserError(f"{source}: {key} must be one of {choices}, got {value!r}")
        return value
    if origin is dict:  # a free table (optimizer_args): keys are checked where they are used
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key} must be a table, e.g. {key} = {{ betas = [0.9, 0.99] }}, "
                            f"got {type_name(value)}")
        check_finite(value, key, source)
        return dict(value)
    if origin is list:
        (item_type,) = args
        if not isinstance(value, list):
            raise UserError(f"{source}: {key} must be an array of {hint_name(item_type)}s, got {type_name(value)}")
        return [coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key} must be a boolean (true or false), got {type_name(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: {key} must be an integer, got {type_name(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {key} must be a number, got {type_name(value)} {value!r}")
        # TOML has nan and inf literals; no setting means anything with them (a NaN learning rate
        # would train to NaN and fail only at export), so every float key refuses them here.
        if not math.isfinite(value):
            raise UserError(f"{source}: {key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{source}: {key} must be a string, got {type_name(value)} {value!r}")
        return value
    raise TypeError(f"config field {key} has unsupported type {hint}")  # a bug in this module, not user input


def check_finite(value: Any, key: str, source: str) -> None:
    """No nan or inf anywhere in a free table's numbers either (nested tables and arrays included)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{source}: {key} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}", source)
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]", source)


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def hint_name(hint: Any) -> str:
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(hint, str(hint))
