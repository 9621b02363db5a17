"""The diffusers <-> LDM key map of SD 1.x single-file checkpoints, and writing such a file.

An LDM file holds the three models under three prefixes:
    model.diffusion_model.input_blocks.1.1.proj_in.weight                 UNet
    first_stage_model.encoder.down.0.block.0.conv1.weight                 VAE
    cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight   CLIP text encoder

The key map is not trusted by construction: `ldm_key_map` proposes an LDM key for every diffusers
key from the LDM block structure, then runs diffusers' own single-file converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`) on a
fake checkpoint whose tensors carry their own key index, and keeps the proposal only if the
converters send every proposed LDM key back to exactly the diffusers key it was proposed for.
`derive_ldm_map` does the same for the keys of an existing file, so a merge into a user's
checkpoint uses exactly the names that file has.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
COMPONENTS = ("unet", "vae", "text_encoder")


def derive_ldm_map(ldm_shapes: Mapping[str, object], unet_config: Mapping, vae_config: Mapping) -> dict[str, dict[str, str]]:
    """{component: {diffusers key: LDM key}} for the keys of an LDM checkpoint, as diffusers reads them.

    `ldm_shapes` maps each LDM key to its tensor or shape (the VAE converter reshapes by rank).
    Runs diffusers' converters on one-element tensors holding their key's index and reads the
    index back out of each converted tensor. Pure: no file is read.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    ldm_keys = list(ldm_shapes)
    tagged = {}
    for index, key in enumerate(ldm_keys):
        ndim = len(tuple(getattr(ldm_shapes[key], "shape", ldm_shapes[key])))
        tagged[key] = torch.full((1,) * ndim, float(index), dtype=torch.float64)

    def invert(converted: Mapping[str, torch.Tensor]) -> dict[str, str]:
        return {k: ldm_keys[int(v.reshape(-1)[0].item())] for k, v in converted.items() if v is not None}

    unet = {k: v for k, v in tagged.items() if k.startswith(LDM_UNET_PREFIX)}
    vae = {k: v for k, v in tagged.items() if k.startswith(LDM_VAE_PREFIX)}
    text = {k: v for k, v in tagged.items() if k.startswith(LDM_TEXT_ENCODER_PREFIX)}
    text_map = invert(convert_ldm_clip_checkpoint(text))
    return {
        "unet": invert(convert_ldm_unet_checkpoint(unet, dict(unet_config))) if unet else {},
        "vae": invert(convert_ldm_vae_checkpoint(vae, dict(vae_config))) if vae else {},
        # transformers 5 dropped the `text_model.` level from CLIPTextModel keys: key the map
        # by the model's own names, as diffusers does when it loads them.
        "text_encoder": {k.removeprefix("text_model."): v for k, v in text_map.items()},
    }


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def propose_ldm_unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """The LDM name (without prefix) of a diffusers UNet key, from the LDM block layout.

    input_blocks: 0 = conv_in, then per down block `layers_per_block` (resnet .0 [+ attention .1])
    and one downsampler (.0.op). output_blocks: per up block `layers_per_block + 1` (resnet .0
    [+ attention .1]); the upsampler follows the last layer's attention at .2, or its resnet at
    .1 when the block has no attention (SD 1.x: output_blocks.2.1, .5.2, .8.2).
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    n = layers_per_block
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + block * (n + 1) + layer
        return f"input_blocks.{i}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = block * (n + 1) + layer
        return f"output_blocks.{i}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * (n + 1) + n}.{slot}.conv.{m[2]}"
    raise ValueError(f"no LDM name for diffusers UNet key {key!r}")


def _resnet_rest(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{_RESNET_TO_LDM.get(module, module)}.{param}"


def propose_ldm_vae_key(key: str, num_up_blocks: int) -> str:
    """The LDM name (without prefix) of a diffusers AutoencoderKL key."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # The LDM decoder numbers its up blocks from the lowest resolution up, diffusers the other way.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise ValueError(f"no LDM name for diffusers VAE key {key!r}")


def _is_vae_attention_weight(diffusers_key: str) -> bool:
    # LDM's VAE attention uses 1x1 convs where diffusers uses Linear: [C, C] <-> [C, C, 1, 1].
    return re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight", diffusers_key) is not None


def ldm_key_map(unet_shapes: Mapping[str, object], vae_shapes: Mapping[str, object],
                text_encoder_keys: Iterable[str], unet_config: Mapping, vae_config: Mapping) -> dict[str, dict[str, str]]:
    """{component: {diffusers key: full LDM key}} for diffusers models, checked against diffusers' converters.

    Arguments are the diffusers state dicts' keys (with tensors or shapes for UNet and VAE) and
    the two model configs. Raises RuntimeError if diffusers' converters do not read the proposed
    LDM keys back to the same diffusers keys (that would be a bug here, not a user error).
    """
    lpb = int(unet_config["layers_per_block"])
    up_types = list(unet_config["up_block_types"])
    with_attention = {i for i, t in enumerate(up_types) if "CrossAttn" in t}
    proposal = {
        "unet": {k: LDM_UNET_PREFIX + propose_ldm_unet_key(k, lpb, with_attention) for k in unet_shapes},
        "vae": {k: LDM_VAE_PREFIX + propose_ldm_vae_key(k, len(vae_config["up_block_types"])) for k in vae_shapes},
        "text_encoder": {k.removeprefix("text_model."): LDM_TEXT_ENCODER_PREFIX + "text_model." + k.removeprefix("text_model.")
                         for k in text_encoder_keys},
    }
    ldm_shapes: dict[str, tuple] = {}
    for k, ldm in proposal["unet"].items():
        ldm_shapes[ldm] = tuple(getattr(unet_shapes[k], "shape", unet_shapes[k]))
    for k, ldm in proposal["vae"].items():
        shape = tuple(getattr(vae_shapes[k], "shape", vae_shapes[k]))
        ldm_shapes[ldm] = shape + (1, 1) if _is_vae_attention_weight(k) else shape
    for ldm in proposal["text_encoder"].values():
        ldm_shapes[ldm] = (1,)
    if len(ldm_shapes) != sum(len(m) for m in proposal.values()):
        raise RuntimeError("two diffusers keys were given the same LDM key")
    derived = derive_ldm_map(ldm_shapes, unet_config, vae_config)
    for component in COMPONENTS:
        if derived[component] != proposal[component]:
            wrong = sorted(set(proposal[component].items()) ^ set(derived[component].items()))[:5]
            raise RuntimeError(f"LDM key map for {component} disagrees with diffusers' converter: {wrong}")
    return proposal


def ldm_key_map_for(components: Mapping[str, torch.nn.Module]) -> dict[str, dict[str, str]]:
    """`ldm_key_map` for in-memory diffusers components {unet, vae, text_encoder}."""
    return ldm_key_map(
        components["unet"].state_dict(), components["vae"].state_dict(), components["text_encoder"].state_dict().keys(),
        components["unet"].config, components["vae"].config,
    )


def to_ldm_state_dict(components: Mapping[str, torch.nn.Module], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LDM single-file state dict of diffusers components {unet, vae, text_encoder}."""
    key_map = ldm_key_map_for(components)
    out: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        state = components[component].state_dict()
        for key, ldm_key in key_map[component].items():
            tensor = state[key].detach().to("cpu")
            if component == "vae" and _is_vae_attention_weight(key):
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[ldm_key] = tensor.contiguous()
    # Real SD 1.x files carry CLIP's position ids; older loaders (A1111's transformers) expect them.
    positions = components["text_encoder"].config.max_position_embeddings
    out[LDM_TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def save_ldm_checkpoint(components: Mapping[str, torch.nn.Module], path: str | Path,
                        dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write diffusers components {unet, vae, text_encoder} as one LDM .safetensors file (atomically)."""
    from safetensors.torch import save_file

    from lora_offset.fileio import atomic_write

    state = to_ldm_state_dict(components, dtype)
    meta = {"format": "pt", **dict(metadata or {})}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))

