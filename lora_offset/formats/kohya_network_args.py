"""kohya's network options as lora-offset's [network] table: --network_module, --network_dim,
--network_alpha, --network_dropout and the `key=value` strings of --network_args. Pure: no I/O.

Two network modules are understood, each with its own defaults:
- `networks.lora` (kohya's LoRA, networks/lora.py `create_network`): dim 4 when --network_dim is
  absent; conv_dim turns the ResNet convs on, conv_alpha 1 when not given.
- `lycoris.kohya` (LyCORIS, lycoris/kohya.py `create_network`): `algo` locon (= lora), loha or lokr;
  `preset` "full" by default (with its convs), "full-lin", "attn-mlp", "attn-only", "unet-only",
  "unet-transformer-only"; conv_dim and conv_alpha default to the network's dim and alpha (a
  conv_dim of 0 too, as there); `factor` is LoKr's; `dropout` defaults to --network_dropout. A flag
  is true unless it reads "false" (LyCORIS's `str_bool`).
kohya and LyCORIS ignore keys they do not know; here an unknown key is a problem naming it.
DoRA (`dora_wd`) is refused: PEFT keeps DoRA's magnitude per output channel while AUTOMATIC1111
v1.10 applies `dora_scale` per input channel, so the file would load wrongly there.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from lora_offset.formats.kohya_options import FAMILY_NETWORK_MODULES

LORA_MODULE = "networks.lora"
LYCORIS_MODULE = "lycoris.kohya"
# LyCORIS preset -> (network.preset, 3x3 convs trained, text encoder trained)
LYCORIS_PRESETS = {"full": ("full", True, True), "full-lin": ("full", False, True),
                   "attn-mlp": ("attn-mlp", False, True), "attn-only": ("attn-only", False, True),
                   "unet-only": ("full", True, False), "unet-transformer-only": ("attn-mlp", False, False)}
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
DORA = ("DoRA is not exported: PEFT keeps DoRA's magnitude per output channel while AUTOMATIC1111 v1.10 applies "
        "dora_scale per input channel, so the file would load wrongly there")
# LyCORIS flags lora-offset does not implement (refused when true) and why
LYCORIS_REFUSED_FLAGS = {
    "dora_wd": DORA,
    "use_tucker": "not implemented: the convs train the plain factors every loader reads",
    "use_cp": "not implemented: the convs train the plain factors every loader reads",
    "use_conv_cp": "not implemented: the convs train the plain factors every loader reads",
    "use_scalar": "not implemented",
    "train_norm": "not implemented: the norm layers are not trained",
    "decompose_both": "not implemented: LoKr's w1 is stored whole",
    "full_matrix": "not implemented",
    "rs_lora": "not implemented",
    "unbalanced_factorization": "not implemented",
    "rescaled": "an OFT option; OFT is not implemented",
    "rank_dropout_scale": "not implemented",
    "train_t5xxl": "a FLUX option (lora-offset trains SD 1.x)",
}
LYCORIS_NO_EFFECT = {"bypass_mode": "only how LyCORIS computes the forward pass; the result is the same",
                     "wd_on_output": "a DoRA option; DoRA is not trained"}
LYCORIS_KEYS = ("algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "factor",
                "disable_conv_cp", "constraint", "constrain", "block_size", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                "loraplus_text_encoder_lr_ratio", *LYCORIS_REFUSED_FLAGS, *LYCORIS_NO_EFFECT)


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
    elif module == LYCORIS_MODULE:
        _lycoris_args(kwargs, t, out, dropout)
    elif module in FAMILY_NETWORK_MODULES:
        out.problems.append(f"--network_module={module}: a network of {FAMILY_NETWORK_MODULES[module]}; "
                            "lora-offset trains Stable Diffusion 1.x")
    else:
        out.problems.append(f"--network_module={module}: not implemented; lora-offset trains {LORA_MODULE} "
                            f"(kohya's LoRA) and {LYCORIS_MODULE} (LyCORIS's locon, loha, lokr)")
    return out


LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
DROPOUT_KEYS = ("rank_dropout", "module_dropout")  # the same names in [network]
BLOCK_LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
BLOCK_DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LORA_KEYS = ("conv_dim", "conv_alpha", *DROPOUT_KEYS, *BLOCK_LR_KEYS, *BLOCK_DIM_KEYS, *LORAPLUS_KEYS)


def _lora_args(kwargs: dict[str, str], t: dict, out: NetworkArgs, train_text_encoder: bool) -> None:
    p = out.problems
    if "dora_wd" in kwargs:
        p.append(f"--network_args dora_wd: {DORA}")
    _unknown({k: v for k, v in kwargs.items() if k != "dora_wd"}, LORA_KEYS, LORA_MODULE, p)
    if "conv_dim" in kwargs:
        t["conv_rank"] = _number(kwargs, "conv_dim", int, p)
        t["conv_alpha"] = _number(kwargs, "conv_alpha", float, p) if "conv_alpha" in kwargs else 1.0
    elif "conv_alpha" in kwargs:
        out.notes.append("--network_args conv_alpha: kohya reads it only with conv_dim; ignored, as there")
    _dropouts(kwargs, t, p)
    _blocks(kwargs, t, out)
    _loraplus(kwargs, t, p, train_text_encoder)


def _numbers(kwargs: dict[str, str], key: str, convert, problems: list[str]) -> list | None:
    """kohya's comma-separated lists; an empty entry of an lr-weight list is 0 (kohya's rule)."""
    try:
        return [convert(x) if x.strip() else 0.0 for x in kwargs[key].split(",")]
    except ValueError:
        kind = "integers" if convert is int else "numbers"
        problems.append(f"--network_args {key}={kwargs[key]}: must be comma-separated {kind}")
        return None


def _blocks(kwargs: dict[str, str], t: dict, out: NetworkArgs) -> None:
    """kohya's block-wise network_args (networks/lora.py create_network, get_block_lr_weight)."""
    p = out.problems
    for key in ("down_lr_weight", "up_lr_weight"):
        if key not in kwargs:
            continue
        if "," not in kwargs[key]:  # a named curve: "cosine", "sine+0.5", ...
            t[key] = kwargs[key]
            continue
        weights = _numbers(kwargs, key, float, p)
        if weights is not None and len(weights) != 12:
            out.notes.append(f"--network_args {key}: {len(weights)} weights; kohya "
                             + ("fills the missing ones with 1" if len(weights) < 12 else "uses the first 12"))
            weights = (weights + [1.0] * 12)[:12]
        t[key] = weights
    if "mid_lr_weight" in kwargs:
        weights = _numbers(kwargs, "mid_lr_weight", float, p)
        t["mid_lr_weight"] = weights[0] if weights else None
    if "block_lr_zero_threshold" in kwargs:
        t["block_lr_zero_threshold"] = _number(kwargs, "block_lr_zero_threshold", float, p)
    for key in BLOCK_DIM_KEYS:
        if key in kwargs:
            t[key] = _numbers(kwargs, key, int if key.endswith("dims") else float, p)
    # kohya reads the per-block alphas and conv dims only with block_dims or an lr weight, and
    # conv_block_alphas only with conv_block_dims: otherwise they are ignored, here as there.
    block_mode = "block_dims" in kwargs or any(k in kwargs for k in BLOCK_LR_KEYS[:3])
    for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
        if key in t and (not block_mode or (key == "conv_block_alphas" and "conv_block_dims" not in kwargs)):
            needs = "conv_block_dims" if block_mode else "block_dims or an lr weight"
            out.notes.append(f"--network_args {key}: kohya reads it only with {needs}; ignored, as there")
            del t[key]


def _dropouts(kwargs: dict[str, str], t: dict, p: list[str]) -> None:
    for key in DROPOUT_KEYS:
        if key in kwargs:
            t[key] = _number(kwargs, key, float, p) or 0.0


def _unknown(kwargs: dict[str, str], known, module: str, problems: list[str]) -> None:
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f"; it takes {', '.join(known)}"
            problems.append(f"--network_args {key}: {module} has no such argument{hint}")


def str_bool(value: str) -> bool:
    """LyCORIS's reading of a flag: anything but "false" (any case) is true."""
    return str(value).lower() != "false"


def _lycoris_args(kwargs: dict[str, str], t: dict, out: NetworkArgs, dropout: float | None) -> None:
    p = out.problems
    _unknown(kwargs, LYCORIS_KEYS, LYCORIS_MODULE, p)
    algo = kwargs.get("algo", "lora").lower() or "lora"
    if algo not in LYCORIS_ALGOS:
        p.append(f"--network_args algo={algo}: not implemented; lora-offset trains locon, loha and lokr")
    t["type"] = LYCORIS_ALGOS.get(algo, "lora")
    preset = kwargs.get("preset", "full")
    if preset not in LYCORIS_PRESETS:
        p.append(f"--network_args preset={preset}: not implemented (a preset file is not read); lora-offset has "
                 f"{', '.join(LYCORIS_PRESETS)}")
        preset = "full"
    t["preset"], conv, te = LYCORIS_PRESETS[preset]
    if not te:
        t["train_text_encoder"] = False
    # LyCORIS: `int(conv_dim or dim)`, `float(conv_alpha or alpha)`
    conv_dim = (_number(kwargs, "conv_dim", int, p) if "conv_dim" in kwargs else None) or t["rank"]
    conv_alpha = (_number(kwargs, "conv_alpha", float, p) if "conv_alpha" in kwargs else None) or t["alpha"]
    t["conv_rank"], t["conv_alpha"] = (conv_dim, conv_alpha) if conv else (0, 1.0)
    if "dropout" in kwargs:
        t["dropout"] = _number(kwargs, "dropout", float, p) or 0.0
    else:
        t["dropout"] = float(dropout or 0.0)
    if "factor" in kwargs:
        if t["type"] == "lokr":
            t["lokr_factor"] = _number(kwargs, "factor", int, p)
        else:
            out.notes.append(f"--network_args factor: LoKr's; ignored with algo={algo}, as in LyCORIS")
    use_tucker = not str_bool(kwargs.get("disable_conv_cp", "true"))
    if use_tucker:
        p.append("--network_args disable_conv_cp=false: " + LYCORIS_REFUSED_FLAGS["use_tucker"])
    for key, why in LYCORIS_REFUSED_FLAGS.items():
        if key in kwargs and str_bool(kwargs[key]):
            p.append(f"--network_args {key}={kwargs[key]}: {why}")
    for key in ("constraint", "constrain", "block_size"):
        if key in kwargs:
            p.append(f"--network_args {key}: an OFT option; OFT is not implemented")
    for key, why in LYCORIS_NO_EFFECT.items():
        if key in kwargs:
            out.notes.append(f"--network_args {key}: no effect here: {why}")
    _dropouts(kwargs, t, p)
    _loraplus(kwargs, t, p, t["train_text_encoder"])


def _loraplus(kwargs: dict[str, str], t: dict, p: list[str], train_text_encoder: bool) -> None:
    ratios = {key: _number(kwargs, key, float, p) for key in LORAPLUS_KEYS if key in kwargs}
    common = ratios.get("loraplus_lr_ratio")
    unet = ratios.get("loraplus_unet_lr_ratio", common)
    te = ratios.get("loraplus_text_encoder_lr_ratio", common)
    if train_text_encoder and unet != te:
        p.append(f"--network_args loraplus: one LoRA+ ratio for the UNet ({unet}) and the text encoder ({te}) is "
                 "implemented (network.loraplus_lr_ratio); give loraplus_lr_ratio alone")
    elif unet is not None:
        t["loraplus_lr_ratio"] = unet
