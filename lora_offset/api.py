"""`export_kohya`: write the LoRA of your own training script as a kohya / A1111 file.

For people who keep their own (diffusers + PEFT) training loop and want lora-offset's file: the
kohya key names every web UI loads, one alpha per file (so diffusers reads it right too), the
`ss_*` metadata with the noise settings, and the `sshs_*` hashes. See examples/plain_diffusers_loop.py.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from lora_offset.formats.keys import TEXT_ENCODER_PREFIX
from lora_offset.formats.kohya import kohya_state_dict, save_lora
from lora_offset.formats.kohya_metadata import ss_metadata

log = logging.getLogger("lora_offset")


def export_kohya(
    path: str | Path,
    unet: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    *,
    noise: Any = None,
    prediction_type: str = "epsilon",
    steps: int | None = None,
    epoch: int | None = None,
    learning_rate: float | None = None,
    optimizer: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    num_train_images: int | None = None,
    seed: int | None = None,
    base_model_name: str | None = None,
    output_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    precision: str = "fp16",
) -> Path:
    """Save the PEFT LoRA (adapter "default") of `unet` and/or `text_encoder` as a kohya file at `path`.

    The models are the ones your loop trained (`unet.add_adapter(LoraConfig(...))`, any targets
    that are Linear or Conv2d layers). `noise` describes the noise you trained with, written as
    kohya's metadata (`ss_noise_offset`, ...): a mapping such as {"offset": 0.1} or a
    `lora_offset.NoiseConfig`. The other keywords go into kohya's `ss_*` fields; what you leave
    out is written as "None" (kohya's way of saying "not set"). `metadata` adds or overrides
    fields. `ss_network_dim` / `ss_network_alpha` are read from the file itself: the most common
    rank and the file's alpha. The file is written atomically; returns its path.
    Raises lora_offset.errors.UserError for an adapter a kohya file cannot hold (DoRA, ...).
    """
    state = kohya_state_dict(unet, text_encoder)
    text_keys = [k for k in state if k.startswith(TEXT_ENCODER_PREFIX + "_")]
    if text_keys and not any("_self_attn_out_proj." in k for k in text_keys):
        # diffusers 0.42 tells the text encoder's LoRA format by its out_proj ("to_out_lora") keys.
        log.warning("%s: the text-encoder LoRA has no self_attn.out_proj module: the web UIs load it, but "
                    "diffusers' load_lora_weights cannot (\"Could not automatically infer state dict type\"); "
                    "add \"out_proj\" to the text encoder's target_modules for a file diffusers reads", path)
    downs = {k: v for k, v in state.items() if k.endswith(".lora_down.weight")}
    alpha = float(next(v for k, v in state.items() if k.endswith(".alpha")))
    dim = _most_common(v.shape[0] for v in downs.values())
    convs = [v.shape[0] for v in downs.values() if v.ndim == 4 and tuple(v.shape[2:]) != (1, 1)]
    if dataclasses.is_dataclass(noise):
        noise = dataclasses.asdict(noise)
    now = time.time()
    unknown = {"ss_steps": steps, "ss_epoch": epoch, "ss_learning_rate": learning_rate, "ss_optimizer": optimizer,
               "ss_num_train_images": num_train_images, "ss_training_started_at": None}
    fields = ss_metadata(
        output_name=output_name or Path(path).stem,
        network_dim=dim,
        network_alpha=alpha,
        conv_dim=_most_common(convs) if convs else 0,
        conv_alpha=alpha,
        train_text_encoder=text_encoder is not None,
        steps=steps or 0,
        epoch=epoch or 0,
        resolution=resolution if resolution is not None else 512,
        learning_rate=learning_rate or 0.0,
        optimizer=optimizer or "",
        num_train_images=num_train_images or 0,
        noise={**dict(noise or {}), "prediction_type": prediction_type},
        started_at=now,
        finished_at=now,
        seed=seed,
        base_model_name=base_model_name,
    )
    for key, value in unknown.items():  # not given: "None", as kohya writes an unset value
        if value is None:
            fields[key] = "None"
    if resolution is None:
        fields["ss_resolution"] = "None"
        del fields["modelspec.resolution"]
    fields.update({str(k): "None" if v is None else str(v) for k, v in (metadata or {}).items()})
    return save_lora(path, state, fields, precision=precision)


def _most_common(values) -> int:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v))
