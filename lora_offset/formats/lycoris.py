"""LyCORIS LoHa / LoKr files in kohya's module naming, written from PEFT adapters.

Per module (the kohya module name of formats/keys.py, as for LoRA), what A1111's
extensions-builtin/Lora/network_hada.py / network_lokr.py, ComfyUI's comfy/weight_adapter/loha.py /
lokr.py and Forge's backend/patcher/lora.py read:

    <name>.hada_w1_a [out, r]   .hada_w1_b [r, in*kh*kw]   .hada_w2_a   .hada_w2_b   .alpha
    <name>.lokr_w1 [a, c]   .lokr_w2 [b, d] or [b, d, kh, kw]   (or lokr_w2_a [b, r], lokr_w2_b [r, d*kh*kw])   .alpha

PEFT 0.21 builds exactly these factors (LoHaLayer / LoKrLayer `create_adapter_parameters` with
use_effective_conv2d off) and scales both products by its `scaling` = alpha / r. The loaders apply
alpha / (rows of hada_w1_b) to LoHa and alpha / (rows of lokr_w2_b, else lokr_w1_b) to LoKr: the same
alpha / r, so alpha = scaling * r is written. A LoKr module whose two factors are stored whole gets
scale 1.0 from every loader whatever its alpha: there PEFT's scaling is folded into lokr_w1 and
alpha = r is written (what LyCORIS itself writes for such modules).
"""

from __future__ import annotations

import torch

from lora_offset.errors import UserError
from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name

LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ADAPTER_NAME = "default"


def lycoris_state_dict(unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None = None
                       ) -> dict[str, torch.Tensor]:
    """LyCORIS tensors (fp32 copies) of the PEFT LoHa / LoKr adapter "default" of `unet` and `text_encoder`."""
    from lora_offset.formats.kohya import check_finite

    state: dict[str, torch.Tensor] = {}
    for prefix, model in ((UNET_PREFIX, unet), (TEXT_ENCODER_PREFIX, text_encoder)):
        if model is not None:
            state.update(_model_tensors(prefix, model))
    if not state:
        raise UserError("export: the model has no LoHa or LoKr layers (adapter 'default'): nothing to save")
    check_finite(state)
    return state


def _model_tensors(prefix: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (LoHaLayer, LoKrLayer)) or ADAPTER_NAME not in module.r:
            continue
        key = kohya_name(prefix, name)
        kind = "LoHa" if isinstance(module, LoHaLayer) else "LoKr"
        if ADAPTER_NAME in getattr(module, "hada_t1", {}) or ADAPTER_NAME in getattr(module, "lokr_t2", {}):
            raise UserError(f"export: {key} is a {kind} layer in Tucker form (use_effective_conv2d); train with it off")
        names = LOHA_FACTORS if kind == "LoHa" else LOKR_FACTORS
        factors = {n: getattr(module, n)[ADAPTER_NAME].detach().to("cpu", torch.float32).clone()
                   for n in names if ADAPTER_NAME in getattr(module, n)}
        rank, scaling = int(module.r[ADAPTER_NAME]), float(module.scaling[ADAPTER_NAME])
        alpha = scaling * rank
        if kind == "LoKr" and "lokr_w1" in factors and "lokr_w2" in factors:
            factors["lokr_w1"] = (factors["lokr_w1"].double() * scaling).float()  # the loaders' scale here is 1.0
            alpha = float(rank)
        out.update({f"{key}.{n}": tensor for n, tensor in factors.items()})
        out[f"{key}.alpha"] = torch.tensor(float(f"{alpha:.12g}"), dtype=torch.float32)
    return out
