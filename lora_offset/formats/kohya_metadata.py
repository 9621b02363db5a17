"""kohya's metadata for a LoRA file: the ss_* training record, modelspec fields, and the
additional-networks hashes that A1111 and kohya show and compare.

Hashes (`sshs_model_hash`, `sshs_legacy_hash`) follow kohya's `precalculate_safetensors_hashes`:
both are taken from the serialization of the tensors with only the `ss_*` metadata, so that
editing other metadata later does not change them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, Mapping

import torch

from lora_offset.errors import UserError
from lora_offset.training.noise import PREDICTION_TYPES

# Noise settings -> kohya metadata names. Values are written as kohya writes its argparse values:
# str(value), so None (off) is "None" and flags are "True"/"False".
NOISE_METADATA_KEYS = {
    "offset": "ss_noise_offset",
    "adaptive_offset": "ss_adaptive_noise_scale",
    "offset_random_strength": "ss_noise_offset_random_strength",
    "pyramid_iterations": "ss_multires_noise_iterations",
    "pyramid_discount": "ss_multires_noise_discount",
    "input_perturbation": "ss_ip_noise_gamma",
    "zero_terminal_snr": "ss_zero_terminal_snr",
    "min_snr_gamma": "ss_min_snr_gamma",
}

# lora-offset's own keys that belong to the training record, so files made from a LoRA keep them
# (merge --base warns about a LoRA trained on a quantized base: training/base_precision.py).
CARRIED_KEYS = ("lora_offset.base_precision",)

LEGACY_HASH_START = 0x100000
LEGACY_HASH_LENGTH = 0x10000


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

def ss_metadata(
    *,
    output_name: str,
    network_dim: int,
    network_alpha: float,
    conv_dim: int = 0,
    conv_alpha: float | None = None,
    train_text_encoder: bool = False,
    steps: int,
    epoch: int,
    resolution: int | tuple[int, int],
    learning_rate: float,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
    optimizer: str,
    num_train_images: int,
    num_reg_images: int = 0,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    noise: Mapping[str, Any] | None = None,
    started_at: float,
    finished_at: float,
    seed: int | None = None,
    mixed_precision: str = "no",
    prior_loss_weight: float = 1.0,
    base_model_name: str | None = None,
    network_type: str = "lora",
    lokr_factor: int = -1,
    more_network_args: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """kohya-compatible `__metadata__` (every value a string) plus the modelspec.* fields.

    `noise` keys: offset, adaptive_offset, offset_random_strength, pyramid_iterations,
    pyramid_discount, input_perturbation, zero_terminal_snr, min_snr_gamma, prediction_type
    ("epsilon" | "v_prediction"); a missing key means "off" (None / False / epsilon), other keys
    are ignored. `resolution` is an int (square) or (width, height). `started_at` / `finished_at`
    are Unix times (time.time()). `network_type` "loha" / "lokr" is recorded as LyCORIS's kohya
    network does it: module "lycoris.kohya", args {"algo": ..., "factor": ...}. `extra` adds or
    overrides fields (values are str()-ed).
    """
    noise = dict(noise or {})
    prediction_type = noise.get("prediction_type") or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"export: prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    v_pred = prediction_type == "v_prediction"
    width, height = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)

    network_args: dict[str, str] = {}
    if conv_dim:
        # kohya keeps its --network_args as the strings the user typed ("conv_dim=4").
        network_args = {"conv_dim": str(int(conv_dim)),
                        "conv_alpha": str(float(conv_alpha if conv_alpha is not None else 1.0))}
    if network_type != "lora":
        network_args = {"algo": network_type, **network_args}
        if network_type == "lokr":
            network_args["factor"] = str(int(lokr_factor))
    network_args.update(more_network_args or {})

    fields: dict[str, Any] = {
        "ss_network_module": "networks.lora" if network_type == "lora" else "lycoris.kohya",
        "ss_network_dim": int(network_dim),
        "ss_network_alpha": float(network_alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": "sd_v1_v" if v_pred else "sd_v1",
        "ss_v2": False,
        "ss_v_parameterization": v_pred,
        "ss_output_name": output_name,
        "ss_training_started_at": float(started_at),
        "ss_training_finished_at": float(finished_at),
        "ss_steps": int(steps),
        "ss_epoch": int(epoch),
        # kohya writes its parsed --resolution, a (width, height) tuple.
        "ss_resolution": (int(width), int(height)),
        "ss_learning_rate": float(learning_rate),
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": text_encoder_lr if train_text_encoder else None,
        "ss_optimizer": optimizer,
        "ss_num_train_images": int(num_train_images),
        "ss_num_reg_images": int(num_reg_images),
        "ss_tag_frequency": json.dumps({d: dict(tags) for d, tags in (tag_frequency or {}).items()}),
        "ss_seed": seed,
        "ss_mixed_precision": mixed_precision,
        "ss_prior_loss_weight": float(prior_loss_weight),
    }
    for setting, key in NOISE_METADATA_KEYS.items():
        default = False if setting in ("offset_random_strength", "zero_terminal_snr") else None
        fields[key] = noise.get(setting, default)
    if base_model_name is not None:
        fields["ss_sd_model_name"] = base_model_name

    metadata = {key: "None" if value is None else str(value) for key, value in fields.items()}
    metadata.update({
        "modelspec.sai_model_spec": "1.0.0",
        # kohya's sai_model_spec: SD 1.x stays "stable-diffusion-v1" also under v-prediction; the
        # prediction type has its own field.
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished_at), datetime.timezone.utc)
        .replace(tzinfo=None).isoformat(),
        "modelspec.resolution": f"{int(width)}x{int(height)}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    })
    for key, value in (extra or {}).items():
        metadata[str(key)] = "None" if value is None else str(value)
    return metadata


def derived_metadata(source: Mapping[str, str], *, output_name: str, network_dim: int | str,
                     network_alpha: float | str, comment: str, extra: Mapping[str, str] | None = None,
                     network_module: str = "networks.lora") -> dict[str, str]:
    """Metadata of a LoRA made from other files (convert, resize, merge, extract).

    Keeps the source's `ss_*` and `modelspec.*` fields and `lora_offset.base_precision` (its training
    record; not its hashes: save_lora computes new ones) and replaces those that describe this file.
    `comment` goes in front of the source's `ss_training_comment`, as kohya's resize_lora.py does.
    """
    def number(x) -> str:
        return x if isinstance(x, str) else str(int(x)) if float(x).is_integer() else repr(float(x))

    carried = {k: v for k, v in source.items() if (k.startswith(("ss_", "modelspec.")) or k in CARRIED_KEYS)
               and k != "modelspec.hash_sha256"}
    previous = carried.get("ss_training_comment")
    metadata = {"ss_base_model_version": "sd_v1", "ss_v2": "False", **carried,
                "ss_network_module": network_module,
                "ss_network_dim": number(network_dim),
                "ss_network_alpha": number(network_alpha),
                "ss_output_name": output_name,
                "ss_training_comment": f"{comment}; {previous}" if previous and previous != "None" else comment,
                "modelspec.architecture": "stable-diffusion-v1/lora",
                "modelspec.title": output_name}
    metadata.update(extra or {})
    return metadata


# --------------------------------------------------------------------------------------------
# Hashes (pure functions on bytes)
# --------------------------------------------------------------------------------------------

def addnet_model_hash(file_bytes: bytes) -> str:
    """sha256 of a safetensors file's bytes after its header (A1111 / additional-networks hash)."""
    header_length = int.from_bytes(file_bytes[:8], "little")
    return hashlib.sha256(file_bytes[8 + header_length:]).hexdigest()


def addnet_legacy_hash(file_bytes: bytes) -> str:
    """First 8 hex digits of the sha256 of bytes [0x100000, 0x110000) (old A1111 model hash)."""
    window = file_bytes[LEGACY_HASH_START:LEGACY_HASH_START + LEGACY_HASH_LENGTH]
    return hashlib.sha256(window).hexdigest()[:8]


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of `tensors` serialized with only the ss_* metadata."""
    import safetensors.torch

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), metadata=ss_only)
    return addnet_model_hash(data), addnet_legacy_hash(data)
