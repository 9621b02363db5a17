"""PEFT adapters on kohya's SD 1.x targets: LoRA, and LyCORIS's LoHa and LoKr (network.type).

The targets are network.preset's (network_targets.py). kohya's default SD 1.x LoRA touches every Linear / 1x1 Conv inside the UNet's transformer blocks
(192 modules in SD 1.5) and, when the text encoder is trained, CLIP's attention and MLP
projections (72 modules). Conv LoRA ("LoCon", conv_rank > 0) adds the ResNet blocks and the
down/up samplers: 3x3 convs get conv_rank/conv_alpha, while their Linear time_emb_proj and 1x1
conv_shortcut get rank/alpha, as kohya does. LoHa and LoKr use the same targets, through PEFT's
LoHaConfig / LoKrConfig (PEFT 0.21, peft/tuners/loha, peft/tuners/lokr):
- LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b) (elementwise) * alpha / r, each pair of rank r =
  network.loha_rank (default network.rank): the delta's rank can reach r^2 for twice LoRA's parameters.
- LoKr: delta = kron(w1, w2) * alpha / r. Each weight [out, in] is split as out = a*b, in = c*d with
  w1 [a, c] and w2 [b, d]; network.lokr_factor (PEFT's decompose_factor) picks a and c (-1: the
  divisor pair nearest the square root). w2 is stored as a rank-r product (r = network.rank) when r
  is below half its larger side, else whole.
The Tucker ("effective conv2d") forms are off: every loader reads the plain factors.
"""

from __future__ import annotations

import re

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig

from lora_offset.errors import UserError
from lora_offset.training.network_targets import (UNET_CONV_3X3_TARGETS, block_pattern, block_ranks,
                                                  text_encoder_targets, unet_targets, uses_blocks)

ADAPTER_NAME = "default"
NETWORK_TYPES = ("lora", "loha", "lokr")
# Parameter-name prefixes of PEFT's LoraModel, LoHaModel and LoKrModel (their `prefix` attribute).
ADAPTER_PARAMETER_PREFIXES = ("lora_", "hada_", "lokr_")

Blocks = tuple  # (linear, conv) of network_targets.block_ranks: per block (rank, alpha), conv None without convs


def unet_lora_config(rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float = 1.0,
                     dropout: float = 0.0, overrides: dict[str, tuple[int, float]] | None = None,
                     preset: str = "kohya", blocks: Blocks | None = None) -> LoraConfig:
    """LoraConfig for the UNet: the preset's targets (network_targets.py), 3x3 convs at conv_rank when > 0.

    `overrides`: {module path: (rank, alpha)} for single modules (a LoRA file with per-module ranks).
    `blocks`: kohya's per-block ranks and alphas (network_targets.block_ranks); rank 0 leaves a block out.
    """
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      **unet_patterns(rank, alpha, conv_rank, conv_alpha, overrides, preset, blocks))


def unet_patterns(rank: int, alpha: float, conv_rank: int, conv_alpha: float, overrides, preset: str,
                  blocks: Blocks | None) -> dict:
    """PEFT's target_modules, rank_pattern, alpha_pattern and exclude_modules for the UNet.

    PEFT takes the first rank/alpha pattern that matches a module name's end, so the order is: single
    modules (`overrides`), then blocks, then the 3x3 convs' conv_rank; `exclude_modules` wins over all."""
    conv_blocks = blocks[1] if blocks is not None else None
    target, conv_targets = unet_targets(preset, conv_rank > 0 or conv_blocks is not None)
    rank_pattern, alpha_pattern = _module_patterns(overrides)
    exclude = []
    for kind, per_block in (("linear", blocks[0] if blocks else None), ("conv", conv_blocks)):
        for block, (block_rank, block_alpha) in enumerate(per_block or []):
            pattern = block_pattern(block, kind)
            if pattern is None or (block == 0 and preset != "full"):  # conv_in (block 0) is "full"'s alone
                continue
            if block_rank == 0:
                exclude.append(pattern)
            elif kind == "conv" or (block_rank, block_alpha) != (rank, alpha):
                rank_pattern[pattern], alpha_pattern[pattern] = block_rank, block_alpha
    if conv_targets is not None:
        if conv_rank > 0:
            rank_pattern[conv_targets], alpha_pattern[conv_targets] = conv_rank, conv_alpha
        else:  # conv_block_dims alone: the 3x3 convs outside every block (conv_out) stay out
            exclude.append(r"conv_out")
    return {"target_modules": target, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "exclude_modules": f"(.*\\.)?({'|'.join(exclude)})" if exclude else None}


def text_encoder_lora_config(rank: int, alpha: float, dropout: float = 0.0,
                             overrides: dict[str, tuple[int, float]] | None = None,
                             preset: str = "kohya") -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      **text_encoder_patterns(overrides, preset))


def text_encoder_patterns(overrides, preset: str) -> dict:
    rank_pattern, alpha_pattern = _module_patterns(overrides)
    return {"target_modules": text_encoder_targets(preset), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern}


def _module_patterns(overrides: dict[str, tuple[int, float]] | None) -> tuple[dict, dict]:
    # PEFT takes the first pattern that matches a module name's end: exact module names go first.
    ranks, alphas = {}, {}
    for path, (rank, alpha) in (overrides or {}).items():
        key = re.escape(path.removeprefix("text_model."))  # a pattern matches the end of a module name
        ranks[key], alphas[key] = rank, alpha
    return ranks, alphas


def unet_network_config(network_type: str, rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float = 1.0,
                        dropout: float = 0.0, lokr_factor: int = -1,
                        overrides: dict[str, tuple[int, float]] | None = None, preset: str = "kohya",
                        rank_dropout: float = 0.0, module_dropout: float = 0.0,
                        blocks: Blocks | None = None) -> LoraConfig | LoHaConfig | LoKrConfig:
    """The PEFT config of a LoRA, LoHa or LoKr on the UNet modules of `preset` (3x3 convs when conv_rank > 0);
    `overrides` (LoRA): per-module (rank, alpha), see unet_lora_config. `rank_dropout` / `module_dropout`: PEFT's,
    for LoHa and LoKr (a LoRA gets kohya's through network_regularizers.add_rank_module_dropout)."""
    if network_type == "lora":
        return unet_lora_config(rank, alpha, conv_rank, conv_alpha, dropout, overrides, preset, blocks)
    patterns = unet_patterns(rank, alpha, conv_rank, conv_alpha, None, preset, blocks)
    return _lycoris_config(network_type, rank, alpha, patterns, lokr_factor, rank_dropout, module_dropout)


def text_encoder_network_config(network_type: str, rank: int, alpha: float, dropout: float = 0.0,
                                lokr_factor: int = -1, overrides: dict[str, tuple[int, float]] | None = None,
                                preset: str = "kohya", rank_dropout: float = 0.0, module_dropout: float = 0.0
                                ) -> LoraConfig | LoHaConfig | LoKrConfig:
    if network_type == "lora":
        return text_encoder_lora_config(rank, alpha, dropout, overrides, preset)
    return _lycoris_config(network_type, rank, alpha, text_encoder_patterns(None, preset), lokr_factor, rank_dropout,
                           module_dropout)


def _lycoris_config(network_type: str, rank: int, alpha: float, patterns: dict, lokr_factor: int,
                    rank_dropout: float = 0.0, module_dropout: float = 0.0) -> LoHaConfig | LoKrConfig:
    common = dict(r=rank, alpha=alpha, **patterns, use_effective_conv2d=False, rank_dropout=rank_dropout,
                  module_dropout=module_dropout)
    if network_type == "loha":
        return LoHaConfig(**common)
    if network_type == "lokr":
        return LoKrConfig(**common, decompose_factor=lokr_factor, decompose_both=False)
    raise ValueError(f"unknown network type {network_type!r}; expected one of {', '.join(NETWORK_TYPES)}")


def network_configs(net, overrides: dict | None = None) -> tuple:
    """(UNet config, text-encoder config or None) for a config's [network] section (lora_offset.config.NetworkConfig).
    `overrides`: {"unet" | "text_encoder": {module path: (rank, alpha)}} of network.dim_from_weights."""
    overrides = overrides or {}
    rank = net.loha_rank if net.type == "loha" and net.loha_rank is not None else net.rank
    blocks = block_ranks(net, rank, net.alpha) if uses_blocks(net) else None
    unet = unet_network_config(net.type, rank, net.alpha, net.conv_rank, net.conv_alpha, net.dropout, net.lokr_factor,
                               overrides.get("unet"), net.preset, net.rank_dropout, net.module_dropout, blocks)
    te = None
    if net.train_text_encoder:
        te = text_encoder_network_config(net.type, rank, net.alpha, net.dropout, net.lokr_factor,
                                         overrides.get("text_encoder"), net.preset, net.rank_dropout,
                                         net.module_dropout)
    return unet, te


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name is a LoRA / LoHa / LoKr weight (PEFT puts the prefix on the parameter's own name)."""
    return any(prefix in name for prefix in ADAPTER_PARAMETER_PREFIXES)


def add_lora(model: torch.nn.Module, config: LoraConfig | LoHaConfig | LoKrConfig) -> list[torch.nn.Parameter]:
    """Inject a LoRA (or LoHa / LoKr) adapter into a diffusers or transformers model; return its trainable parameters.

    The base weights stay frozen (in whatever dtype they have); adapter weights are created and kept
    in fp32 so that small updates are not lost to half-precision rounding.
    """
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=ADAPTER_NAME)
    params = [p for n, p in model.named_parameters() if is_adapter_parameter(n)]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry an adapter (PEFT's LoRA / LoHa / LoKr layer wrappers), in model order."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, (LoraLayer, LoHaLayer, LoKrLayer))]


def lora_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if is_adapter_parameter(n))


def matches(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None


# ---------------------------------------------------------------------------------------------------
# Starting from an existing LoRA (network.weights): kohya, diffusers or PEFT files, as `convert` reads them


def read_weights(path: str):
    """The LoRA file network.weights names, read whole (lora_offset.formats.reader); one UserError if unusable."""
    from lora_offset.formats.reader import read_adapter

    return read_adapter(path, "network.weights")


def _kind(module) -> str:
    if module.component == "text_encoder":
        return "text encoder"
    if matches(UNET_CONV_3X3_TARGETS, module.path):
        return "conv"
    return "unet"


def dims_from_weights(adapter, net):
    """network.dim_from_weights: (NetworkConfig with rank/alpha/conv_rank/conv_alpha of the file, overrides)
    where overrides = {component: {module path: (rank, alpha)}} for modules whose own rank or alpha differ
    from those (component "unet" or "text_encoder")."""
    import collections
    import dataclasses

    def alpha_of(module) -> float:
        return float(f"{module.scale * module.rank:.12g}")  # the alpha that gives the module its scale

    dims = {}
    for kind in ("unet", "conv"):
        found = [(m.rank, alpha_of(m)) for m in adapter.modules.values() if _kind(m) == kind or
                 (kind == "unet" and _kind(m) == "text encoder")]
        dims[kind] = collections.Counter(found).most_common(1)[0][0] if found else None
    rank, alpha = dims["unet"] or (net.rank, net.alpha)
    conv_rank, conv_alpha = dims["conv"] or (0, net.conv_alpha)
    overrides: dict[str, dict[str, tuple[int, float]]] = {"unet": {}, "text_encoder": {}}
    for m in adapter.modules.values():
        default = (conv_rank, conv_alpha) if _kind(m) == "conv" else (rank, alpha)
        if (m.rank, alpha_of(m)) != default:
            overrides[m.component][m.path] = (m.rank, alpha_of(m))
    net = dataclasses.replace(net, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)
    return net, overrides


def load_weights(adapter, unet, text_encoder=None) -> int:
    """Set the LoRA of `unet` (and `text_encoder`) to the file's: each module's delta equals the file's
    (scale * up @ down; a scale that differs from the layer's is folded into lora_up). Modules the file
    lacks keep their fresh start (lora_up = 0: no change). Returns the number of modules set."""
    from peft.tuners.lora import LoraLayer

    from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name

    layers = {}
    for prefix, model in ((UNET_PREFIX, unet), (TEXT_ENCODER_PREFIX, text_encoder)):
        if model is not None:
            layers.update({kohya_name(prefix, n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)})
    source = adapter.path
    for m in adapter.modules.values():
        key = m.kohya_key
        if key not in layers:
            why = {"text encoder": "set network.train_text_encoder = true to train it from the file",
                   "conv": "the file is a conv LoRA (LoCon): set network.conv_rank (or network.dim_from_weights = true)",
                   }.get(_kind(m), "lora-offset's network has no LoRA on that module")
            raise UserError(f"network.weights: {source}: module {key} ({_kind(m)}) is not in this network; {why}")
        layer = layers[key]
        down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        if tuple(down.shape) != tuple(m.down.shape) or tuple(up.shape) != tuple(m.up.shape):
            raise UserError(f"network.weights: {source}: module {key} has lora_down {tuple(m.down.shape)} and lora_up "
                            f"{tuple(m.up.shape)} (rank {m.rank}); this network's are {tuple(down.shape)} and "
                            f"{tuple(up.shape)} (rank {down.shape[0]}): set network.rank / conv_rank to the file's, "
                            "or network.dim_from_weights = true")
        scaling = float(layer.scaling[ADAPTER_NAME])
        with torch.no_grad():
            down.copy_(m.down)
            up.copy_(m.up if m.scale == scaling else (m.up.double() * (m.scale / scaling)).float())
    return len(adapter.modules)
