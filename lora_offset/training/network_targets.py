"""Which SD 1.x modules a network trains, and at which rank: target presets and kohya's block numbering.

Pure: module-name regexes (diffusers UNet paths, CLIP text-encoder paths; PEFT full-matches a string
`target_modules` against each module name) and arithmetic on kohya's block indices. No torch.

Presets (`network.preset`), named as LyCORIS names its own (lycoris/config.py PRESET), on SD 1.x:
- "kohya" (default): kohya's networks.lora, every Linear / 1x1 Conv inside the UNet's transformer
  blocks (192 modules in SD 1.5) and CLIP's attention and MLP projections (72); with conv_rank > 0
  also the ResNet blocks and the down/up samplers (kohya's LoCon: 3x3 convs at conv_rank, the
  ResNets' Linear time_emb_proj and 1x1 conv_shortcut at rank).
- "attn-only": the attention projections only, to_q / to_k / to_v / to_out.0 of attn1 and attn2
  (128 in SD 1.5; diffusers' LoRA training scripts' targets) and CLIP's q / k / v / out_proj (48).
- "attn-mlp": every Linear / 1x1 Conv of the transformer blocks (what "kohya" is without convs).
- "full": everything LyCORIS's "full" trains: "kohya"'s modules with the ResNets, plus
  time_embedding.linear_1 / linear_2, and with conv_rank > 0 the 3x3 convs, conv_in and conv_out
  too (with conv_rank = 0 it is LyCORIS's "full-lin").

kohya's SD 1.x blocks (networks/lora.py `get_block_index`), 25 of them, named by the original
(LDM) UNet's layout: 0-11 are input_blocks.0-11 (down_lr_weight), 12 the middle block
(mid_lr_weight), 13-24 output_blocks.0-11 (up_lr_weight). In diffusers names: down_blocks.i's
attentions.j / resnets.j are block 1 + 3i + j and its downsampler 3 + 3i; up_blocks.i's are 13 + 3i + j
and its upsampler 15 + 3i (it shares output_blocks.3i+2 with the block's last ResNet); mid_block is
12. Block 0 (input_blocks.0) is conv_in, which kohya never trains ("full" does); time_embedding and
conv_out are in no block.
"""

from __future__ import annotations

import math
import re

PRESETS = ("kohya", "attn-only", "attn-mlp", "full")
NUM_BLOCKS = 25  # 12 down, 1 mid, 12 up
MID_BLOCK = 12

UNET_ATTENTION_TARGETS = (
    r".*attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
)
UNET_ATTENTION_ONLY_TARGETS = r".*attentions\.\d+\.transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
UNET_CONV_3X3_TARGETS = r".*(resnets\.\d+\.(conv1|conv2)|downsamplers\.0\.conv|upsamplers\.0\.conv)"
UNET_CONV_RANK_TARGETS = r".*resnets\.\d+\.(time_emb_proj|conv_shortcut)"
UNET_FULL_LINEAR_TARGETS = r"time_embedding\.(linear_1|linear_2)"
UNET_FULL_CONV_TARGETS = r"(conv_in|conv_out)"
# transformers 5 CLIPTextModel names have no "text_model." level; 4.x names do: match both.
TEXT_ENCODER_TARGETS = r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
TEXT_ENCODER_ATTENTION_TARGETS = r"(text_model\.)?encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"


def _any(*patterns: str) -> str:
    return patterns[0] if len(patterns) == 1 else "(" + "|".join(patterns) + ")"


def unet_targets(preset: str, conv: bool) -> tuple[str, str | None]:
    """(the UNet modules a preset trains, the 3x3 convs among them, which take conv_rank) as regexes;
    `conv`: conv_rank > 0."""
    if preset == "attn-only":
        return UNET_ATTENTION_ONLY_TARGETS, None
    if preset == "attn-mlp" or (preset == "kohya" and not conv):
        return UNET_ATTENTION_TARGETS, None
    if preset == "kohya":
        return _any(UNET_ATTENTION_TARGETS, UNET_CONV_3X3_TARGETS, UNET_CONV_RANK_TARGETS), UNET_CONV_3X3_TARGETS
    if preset == "full":
        linear = (UNET_ATTENTION_TARGETS, UNET_CONV_RANK_TARGETS, UNET_FULL_LINEAR_TARGETS)
        if not conv:
            return _any(*linear), None
        conv_targets = _any(UNET_CONV_3X3_TARGETS, UNET_FULL_CONV_TARGETS)
        return _any(*linear, UNET_CONV_3X3_TARGETS, UNET_FULL_CONV_TARGETS), conv_targets
    raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")


def text_encoder_targets(preset: str) -> str:
    return TEXT_ENCODER_ATTENTION_TARGETS if preset == "attn-only" else TEXT_ENCODER_TARGETS


# --------------------------------------------------------------------------------------------------- blocks

_UP_DOWN = re.compile(r"(?:^|\.)(up|down)_blocks\.(\d+)\.(resnets|upsamplers|downsamplers|attentions)\.(\d+)\.")


def block_index(path: str) -> int | None:
    """kohya's SD 1.x block of a UNet module path (diffusers naming), None when it is in no block."""
    m = _UP_DOWN.search(path + ".")
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        index = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + index if side == "down" else MID_BLOCK + 1 + index
    if re.search(r"(?:^|\.)mid_block\.", path + "."):
        return MID_BLOCK
    if re.fullmatch(r"(.*\.)?conv_in", path):
        return 0
    return None


def block_pattern(block: int, kind: str) -> str | None:
    """A regex for the modules of one kind in `block` (0..24): kind "conv" = the 3x3 convs (conv_rank's),
    "linear" = the rest (Linear and 1x1 conv); None when the block has none of that kind."""
    if block == 0:
        return r"conv_in" if kind == "conv" else None
    if block == MID_BLOCK:
        return (r"mid_block\.resnets\.\d+\.(conv1|conv2)" if kind == "conv" else
                r"mid_block\.(attentions\.\d+\..*|resnets\.\d+\.(time_emb_proj|conv_shortcut))")
    side, index = ("down", block - 1) if block < MID_BLOCK else ("up", block - MID_BLOCK - 1)
    i, j = divmod(index, 3)
    prefix = rf"{side}_blocks\.{i}\."
    if side == "down" and j == 2:  # input_blocks.3/6/9: the downsampler alone
        return rf"{prefix}downsamplers\.0\.conv" if kind == "conv" else None
    if kind == "linear":
        return rf"{prefix}(attentions\.{j}\..*|resnets\.{j}\.(time_emb_proj|conv_shortcut))"
    sampler = rf"|{prefix}upsamplers\.0\.conv" if side == "up" and j == 2 else ""
    return rf"({prefix}resnets\.{j}\.(conv1|conv2){sampler})"


# ------------------------------------------------------------------------------ per-block ranks and lr weights

LR_CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")
BLOCK_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas", "conv_block_dims",
              "conv_block_alphas")


def lr_curve(spec: str, length: int = 12) -> list[float]:
    """kohya's named lr-weight curves over the 12 down or up blocks: "cosine", "sine", "linear",
    "reverse_linear", "zeros", each optionally "+base" (networks/lora.py get_block_lr_weight)."""
    name, _, base = spec.partition("+")
    offset = float(base) if base else 0.0
    steps = [i / (length - 1) for i in range(length)]
    curves = {"cosine": [math.sin(math.pi * t / 2) for t in reversed(steps)],
              "sine": [math.sin(math.pi * t / 2) for t in steps],
              "linear": steps, "reverse_linear": list(reversed(steps)), "zeros": [0.0] * length}
    if name not in curves:
        raise ValueError(f"unknown lr weight curve {name!r}; kohya's are {', '.join(LR_CURVES)}")
    return [w + offset for w in curves[name]]


def block_lr_weights(net) -> list[float] | None:
    """The 25 blocks' learning-rate weights of [network] `net` (1 where unset; at or below
    block_lr_zero_threshold, 0), or None when no lr weight is set."""
    if net.down_lr_weight is None and net.mid_lr_weight is None and net.up_lr_weight is None:
        return None

    def side(value) -> list[float]:
        if value is None:
            return [1.0] * 12
        return lr_curve(value) if isinstance(value, str) else [float(w) for w in value]

    weights = side(net.down_lr_weight) + [1.0 if net.mid_lr_weight is None else float(net.mid_lr_weight)] + side(
        net.up_lr_weight)
    given = ([True] * 12 if net.down_lr_weight is not None else [False] * 12) + [net.mid_lr_weight is not None] + (
        [True] * 12 if net.up_lr_weight is not None else [False] * 12)
    # kohya thresholds only the lists that were given: w if w > threshold else 0
    return [w if not g or w > net.block_lr_zero_threshold else 0.0 for w, g in zip(weights, given)]


def uses_blocks(net) -> bool:
    return any(getattr(net, key) is not None for key in BLOCK_KEYS)


def block_ranks(net, rank: int, alpha: float) -> tuple[list[tuple[int, float]], list[tuple[int, float]] | None]:
    """(linear, conv): per block, the (rank, alpha) of its Linear / 1x1 modules and of its 3x3 convs
    (conv None: no convs train). kohya's rules: block_dims / block_alphas default to rank / alpha,
    conv_block_dims to conv_rank where it is > 0, conv_block_alphas to conv_alpha; a block whose lr
    weight is 0 gets rank 0 (it is left out)."""
    dims = net.block_dims or [rank] * NUM_BLOCKS
    alphas = net.block_alphas or [alpha] * NUM_BLOCKS
    linear = [(int(d), float(a)) for d, a in zip(dims, alphas)]
    conv = None
    if net.conv_block_dims is not None or net.conv_rank > 0:
        conv_dims = net.conv_block_dims or [net.conv_rank] * NUM_BLOCKS
        conv_alphas = net.conv_block_alphas or [net.conv_alpha] * NUM_BLOCKS
        conv = [(int(d), float(a)) for d, a in zip(conv_dims, conv_alphas)]
    weights = block_lr_weights(net)
    if weights is not None:
        linear = [(0, a) if w == 0 else (d, a) for (d, a), w in zip(linear, weights)]
        conv = conv and [(0, a) if w == 0 else (d, a) for (d, a), w in zip(conv, weights)]
    return linear, conv
