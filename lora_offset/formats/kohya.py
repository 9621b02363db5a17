"""Write a PEFT-LoRA'd SD 1.x model as a kohya / A1111 LoRA file (.safetensors).

Per LoRA'd module the file holds (see DESIGN.md §3)::

    <kohya name>.lora_down.weight   PEFT lora_A   [r, in] or [r, in, kh, kw]
    <kohya name>.lora_up.weight     PEFT lora_B   [out, r] or [out, r, 1, 1]
    <kohya name>.alpha              0-dim scalar; every loader applies scale = alpha / r

Alpha: one value for the whole file, the scale folded into lora_up where a module differs.
Each module's true scale is the PEFT layer's own `scaling` (lora_alpha / r, or / sqrt(r) under
rsLoRA, with rank_pattern / alpha_pattern applied). The plain way to store it is alpha = scaling * r
per module, but diffusers 0.42 (`load_lora_weights`) cannot read alphas that differ between the
modules of one model: it keeps the most common alpha as `lora_alpha` and sends the others to
PEFT's `alpha_pattern` under names built by `_get_alpha_name`, which for the UNet attention
projections ("...attn1.processor.to_q_lora.down.weight.alpha") and for every text-encoder module
("...self_attn" / "...mlp.fc1.lora_linear_layer") match no module, so those modules silently get
the common alpha; PEFT only emits a RuntimeWarning (tests/test_export.py pins this). What does load
right: distinct alphas on proj_in/proj_out, ff and the conv-LoRA modules (so conv_alpha alone would
work), and a text-encoder alpha that differs from the UNet's (each model gets its own config).
Rather than depend on which names survive, the file gets one alpha, and every loader (A1111,
Forge, ComfyUI, InvokeAI, kohya, diffusers) computes the same delta:

    alpha_file = the most common scaling * r over the modules (normally the network alpha)
    lora_up'   = lora_up * (scaling * r / alpha_file)     for the modules whose value differs
    => alpha_file / r * lora_up' @ lora_down == scaling * lora_up @ lora_down

So a plain rank-16 / alpha-8 LoRA is written exactly as kohya writes it (a module at another rank
but the same alpha needs no fold either: loaders divide by each module's own r); with conv LoRA
and conv_alpha != alpha, the 3x3 conv modules carry their scale in lora_up, and `ss_network_args`
still records the conv_dim / conv_alpha they were trained with.

Tensors are stored in the save precision,
alphas included (kohya casts its whole state dict, alpha buffers too); an alpha the precision
rounds has its rounding factor taken out of lora_up.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lora_offset.errors import UserError
from lora_offset.fileio import atomic_path
from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name
from lora_offset.formats.kohya_metadata import sshs_hashes
from lora_offset.training.networks import ADAPTER_NAME

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# PEFT `init_lora_weights` values whose adapter is exactly W + scaling * B @ A on the untouched
# base weight. PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base weight at init (the file
# would then apply to a base model nobody has); MiCA is a LoRA variant with its own forward.
EXPORTABLE_INITS = (True, False, "gaussian", "eva", "orthogonal")


# --------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------

def kohya_state_dict(unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None = None
                     ) -> dict[str, torch.Tensor]:
    """kohya-named fp32 tensors of the adapter "default" in `unet` and (optionally) `text_encoder`.

    The tensors are copies (training may go on after an intermediate save). Raises UserError for
    adapters that cannot be written as plain kohya LoRA (DoRA, base-rewriting inits, variants,
    LoRA bias, layer types other than Linear/Conv2d) and for non-finite weights.
    """
    modules: list[tuple[str, torch.Tensor, torch.Tensor, int, float]] = []
    for prefix, model in ((UNET_PREFIX, unet), (TEXT_ENCODER_PREFIX, text_encoder)):
        if model is not None:
            modules.extend(_lora_modules(prefix, model))
    if not modules:
        raise UserError("export: the model has no LoRA layers (adapter 'default'): nothing to save")

    state, _, _ = uniform_alpha_tensors(modules)
    check_finite(state)
    return state


def uniform_alpha_tensors(modules: Sequence[tuple[str, torch.Tensor, torch.Tensor, int, float]]
                          ) -> tuple[dict[str, torch.Tensor], float, int]:
    """kohya tensors with ONE alpha for every module: (state dict, that alpha, modules folded).

    `modules` holds (kohya module key, lora_down, lora_up, rank, scale). The file alpha is the
    most common scale*rank; a module whose own alpha differs gets the ratio folded into its
    lora_up, so every loader's alpha/r*up@down is still its true delta (see the module docstring).
    Used by the exporter and by `convert`.
    """
    file_alpha = _file_alpha([_alpha_value(scale, rank) for _, _, _, rank, scale in modules])
    state: dict[str, torch.Tensor] = {}
    folded = 0
    for key, down, up, rank, scale in modules:
        module_alpha = scale * rank
        up = up.detach().to("cpu", torch.float32)
        if not math.isclose(module_alpha, file_alpha, rel_tol=1e-9):
            # In float64 so that the fold adds no rounding beyond the final float32 one.
            up = (up.double() * (module_alpha / file_alpha)).float()
            folded += 1
        state[f"{key}.lora_down.weight"] = down.detach().to("cpu", torch.float32).clone()
        state[f"{key}.lora_up.weight"] = up.clone()
        state[f"{key}.alpha"] = torch.tensor(file_alpha, dtype=torch.float32)
    return state, file_alpha, folded


def _lora_modules(prefix: str, model: torch.nn.Module):
    """(kohya key, lora_A weight, lora_B weight, r, scaling) per LoRA layer of adapter "default"."""
    from peft.tuners.lora import Conv2d as LoraConv2d
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    _check_adapter_config(prefix, model)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = kohya_name(prefix, name)
        if ADAPTER_NAME not in module.lora_A:
            continue  # a layer of another adapter only
        if module.use_dora.get(ADAPTER_NAME, False):
            raise UserError(f"export: {key} is a DoRA layer (use_dora=True); DoRA cannot be saved as a "
                            "kohya LoRA: train with use_dora off")
        if ADAPTER_NAME in getattr(module, "lora_variant", {}):
            variant = type(module.lora_variant[ADAPTER_NAME]).__name__
            raise UserError(f"export: {key} uses the LoRA variant {variant}, which a kohya LoRA file cannot "
                            "express: train a plain LoRA")
        if getattr(module, "lora_bias", {}).get(ADAPTER_NAME, False):
            raise UserError(f"export: {key} has a LoRA bias (lora_bias=True), which kohya LoRA files cannot "
                            "hold: train with lora_bias off")
        if type(module) not in (LoraLinear, LoraConv2d):
            raise UserError(f"export: {key} is a {type(module).__name__} LoRA layer; only Linear and Conv2d "
                            "layers can be written as kohya LoRA")
        down = module.lora_A[ADAPTER_NAME].weight
        up = module.lora_B[ADAPTER_NAME].weight
        found.append((key, down, up, int(module.r[ADAPTER_NAME]), float(module.scaling[ADAPTER_NAME])))
    return found


def _check_adapter_config(prefix: str, model: torch.nn.Module) -> None:
    config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        return  # layers are still checked one by one
    if getattr(config, "use_dora", False):
        raise UserError(f"export: the {prefix} adapter uses DoRA (use_dora=True); DoRA cannot be saved as a "
                        "kohya LoRA: train with use_dora off")
    init = getattr(config, "init_lora_weights", True)
    if not any(init is ok or (isinstance(init, str) and init == ok) for ok in EXPORTABLE_INITS):
        raise UserError(f"export: the {prefix} adapter was initialized with init_lora_weights={init!r}, which "
                        "changes the base weights or the LoRA forward; such an adapter cannot be saved as a kohya "
                        "LoRA: use "
                        "init_lora_weights='gaussian' or True")


def _alpha_value(scaling: float, rank: int) -> float:
    # scaling * r rounded to 12 digits: alpha 0.3 at r=3 is 0.3, not 0.30000000000000004, so equal
    # alphas count as equal and the file shows the number the user typed.
    return float(f"{scaling * rank:.12g}")


def _file_alpha(module_alphas: list[float]) -> float:
    """The alpha written for every module: the most common one (first seen on a tie)."""
    alpha = collections.Counter(module_alphas).most_common(1)[0][0]
    if not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"export: LoRA alpha is {alpha}; it must be a positive number (alpha 0 makes the "
                        "adapter do nothing): set network alpha > 0")
    return alpha


def check_finite(tensors: Mapping[str, torch.Tensor], advice: str | None = None) -> None:
    """Raise UserError naming the first tensor that holds a NaN or an infinity."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            advice = advice or ("the training diverged: lower the learning rate or resume from an earlier "
                                "checkpoint")
            raise UserError(f"export: {key} holds {bad} non-finite value(s) (NaN/inf); {advice}. "
                            "Nothing was written")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def save_lora(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
              precision: str = "fp16") -> Path:
    """Cast to `precision` (alphas too), add sshs_* hashes, write `path` atomically; return it.

    Like kohya, alphas are stored in the save precision. An alpha the precision cannot hold exactly
    (bf16 stores 0.3 as 0.30078) would scale the whole module by the rounding error, so that
    factor is taken out of the module's lora_up (LoHa: hada_w1_a, LoKr: lokr_w1) before it is cast.
    """
    import safetensors.torch

    if precision not in PRECISIONS:
        raise UserError(f"export: save precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must be str -> str; {key!r} has {type(value).__name__}")
    check_finite(state_dict)
    dtype = PRECISIONS[precision]
    tensors = {key: tensor.detach().to("cpu", dtype).contiguous()
               for key, tensor in _compensate_alpha_rounding(state_dict, dtype).items()}
    check_finite(tensors, advice=f"the weights overflow {precision}: save with precision 'bf16' or 'fp32'")

    model_hash, legacy_hash = sshs_hashes(tensors, metadata)
    full = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(full)) + (1 << 12)
    with atomic_path(path, size_hint=size) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=full)
    return Path(path)


def precision_of(dtypes) -> str:
    """The save precision ("fp16", "bf16", "fp32") of tensors of these torch dtypes; fp32 when they mix."""
    names = {dtype: name for name, dtype in PRECISIONS.items()}
    found = {names.get(dtype, "fp32") for dtype in dtypes}
    return found.pop() if len(found) == 1 else "fp32"


def _compensate_alpha_rounding(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype
                               ) -> dict[str, torch.Tensor]:
    state = dict(state_dict)
    for key, alpha in state_dict.items():
        if not key.endswith(".alpha"):
            continue
        stem = key[: -len("alpha")]
        # The factor that carries the module's scale: LoRA's lora_up, LoHa's hada_w1_a, LoKr's w1;
        # none for a LoKr without a low-rank factor (the loaders ignore its alpha).
        lokr_low_rank = f"{stem}lokr_w1_b" in state or f"{stem}lokr_w2_b" in state
        candidates = ["lora_up.weight", "hada_w1_a"] + (["lokr_w1", "lokr_w1_a"] if lokr_low_rank else [])
        up_key = next((stem + c for c in candidates if stem + c in state), None)
        exact, stored = alpha.double().item(), alpha.to(dtype).double().item()
        if up_key is not None and stored != exact and stored != 0:
            state[up_key] = (state[up_key].double() * (exact / stored)).float()
    return state
