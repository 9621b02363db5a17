"""kohya's network options as lora-offset's [network] table: --network_module, --network_dim,
--network_alpha, --network_dropout and the `key=value` strings of --network_args. Pure: no I/O.

`networks.lora` (kohya's LoRA, networks/lora.py `create_network`) reads its network_args with these
defaults: dim 4 when --network_dim is absent, conv_alpha 1 when conv_dim is given without it. kohya
ignores keys it does not know; here an unknown key is a problem naming it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

LORA_MODULE = "networks.lora"


@dataclass
class NetworkArgs:
    table: dict[str, Any] = field(default_factory=dict)  # lora-offset's [network] keys
    notes: list[str] = field(default_factory=list)  # info lines
    problems: list[str] = field(default_factory=list)  # what cannot be honoured, each with its reason


def split_network_args(items: list[str] | None, problems: list[str]) -> dict[str, str]:
    """kohya's parsing: each item is `key=value`, split at the first "="; values stay strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"--network_args {item!r}: expected key=value, e.g. conv_dim=4")
            continue
        out[key.strip()] = value.strip()
    return out


def _number(kwargs: dict[str, str], key: str, convert, problems: list[str]):
    try:
        return convert(kwargs[key])
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        problems.append(f"--network_args {key}={kwargs[key]}: must be {kind}")
        return None


def network_table(module: str | None, dim: int | None, alpha: float, dropout: float | None, items: list[str] | None,
                  train_text_encoder: bool) -> NetworkArgs:
    out = NetworkArgs()
    module = module or LORA_MODULE  # kohya requires it; its documented recipes all give networks.lora
    kwargs = split_network_args(items, out.problems)
    t = out.table
    t["train_text_encoder"] = train_text_encoder
    t["rank"] = dim if dim is not None else 4
    t["alpha"] = float(alpha) if alpha is not None else 1.0
    t["dropout"] = float(dropout or 0.0)
    if module == LORA_MODULE:
        out.notes.append(f"--network_module={LORA_MODULE}: kohya's LoRA, trained as network.type = \"lora\"")
        _lora_args(kwargs, t, out, train_text_encoder)
    else:
        out.problems.append(f"--network_module={module}: lora-offset trains {LORA_MODULE} (kohya's LoRA)")
    return out


LORA_KEYS = ("conv_dim", "conv_alpha", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
             "loraplus_text_encoder_lr_ratio")


def _lora_args(kwargs: dict[str, str], t: dict, out: NetworkArgs, train_text_encoder: bool) -> None:
    p = out.problems
    for key in kwargs:
        if key not in LORA_KEYS:
            close = difflib.get_close_matches(key, LORA_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f"; it takes {', '.join(LORA_KEYS)}"
            p.append(f"--network_args {key}: {LORA_MODULE} has no such argument{hint}")
    if "conv_dim" in kwargs:
        t["conv_rank"] = _number(kwargs, "conv_dim", int, p)
        t["conv_alpha"] = _number(kwargs, "conv_alpha", float, p) if "conv_alpha" in kwargs else 1.0
    elif "conv_alpha" in kwargs:
        out.notes.append("--network_args conv_alpha: kohya reads it only with conv_dim; ignored, as there")
    _loraplus(kwargs, t, p, train_text_encoder)


def _loraplus(kwargs: dict[str, str], t: dict, p: list[str], train_text_encoder: bool) -> None:
    ratios = {key: _number(kwargs, key, float, p) for key in LORA_KEYS[2:] if key in kwargs}
    common = ratios.get("loraplus_lr_ratio")
    unet = ratios.get("loraplus_unet_lr_ratio", common)
    te = ratios.get("loraplus_text_encoder_lr_ratio", common)
    if train_text_encoder and unet != te:
        p.append(f"--network_args loraplus: one LoRA+ ratio for the UNet ({unet}) and the text encoder ({te}) is "
                 "implemented (network.loraplus_lr_ratio); give loraplus_lr_ratio alone")
    elif unet is not None:
        t["loraplus_lr_ratio"] = unet
