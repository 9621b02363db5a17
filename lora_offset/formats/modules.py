"""One adapted module of an SD 1.x model, whatever its kind: its factors, the scale the web UIs
apply to them, and its delta. LoRA, and LyCORIS's LoHa and LoKr (formats/lycoris.py writes those).

The scale rules are the loaders' (their oracles: formats/loaders/a1111.py a1111_weight_delta,
formats/loaders/comfyui.py comfyui_weight_delta): alpha divided by the rank of the module's low-rank
product (`alpha_rank`), 1.0 without alpha, and 1.0 for a LoKr whose two factors are stored whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name

if TYPE_CHECKING:  # torch is imported only where tensors are used: `inspect` reads headers without it
    import torch

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KINDS = {"lora": LORA_SUFFIXES, "loha": LOHA_SUFFIXES, "lokr": LOKR_SUFFIXES}
# The 3x3 convolutions of an SD 1.x UNet (the others are 1x1: proj_in/proj_out, conv_shortcut).
_CONV3X3 = re.compile(r"(.*\.(conv1|conv2)|.*(downsamplers|upsamplers)\.0\.conv|conv_in|conv_out)")
_CONV1X1 = re.compile(r".*\.(proj_in|proj_out|conv_shortcut)")


def module_kind(suffixes) -> str | None:
    """"lora", "loha" or "lokr" for a module's key suffixes (parse_key roles); None if they mix kinds."""
    kinds = {kind for kind, names in (("lora", ("down", "up")), ("loha", LOHA_SUFFIXES), ("lokr", LOKR_SUFFIXES))
             if any(s in suffixes for s in names)}
    return kinds.pop() if len(kinds) == 1 else ("lora" if not kinds else None)


def alpha_rank(kind: str, shapes: Mapping[str, tuple]) -> int | None:
    """The rank the loaders divide a module's alpha by (scale = alpha / rank, or 1.0 without alpha);
    None where they ignore alpha (a LoKr module whose two factors are stored whole: scale 1.0).

    `shapes`: {suffix or role: shape}. LoRA: lora_down's rows; LoHa: hada_w1_b's rows (A1111
    network_hada.py, ComfyUI weight_adapter/loha.py); LoKr: lokr_w2_b's rows, else lokr_w1_b's
    (A1111 network_lokr.py, ComfyUI weight_adapter/lokr.py, Forge backend/patcher/lora.py).
    """
    if kind == "lora":
        return int(shapes["down"][0])
    if kind == "loha":
        return int(shapes["hada_w1_b"][0])
    low = shapes.get("lokr_w2_b", shapes.get("lokr_w1_b"))
    return None if low is None else int(low[0])


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module of an SD 1.x model: its factors as stored, and the scale loaders apply.

    `kind` "lora": delta W = scale * up @ down (convolutions on flattened weights). "loha" and
    "lokr": LyCORIS's factors (`factors` keyed by their suffixes: hada_w1_a ..., lokr_w1 ...),
    delta in lowrank.loha_delta / lowrank.lokr_delta. `component` is "unet" or "text_encoder";
    `path` the diffusers UNet module path or the CLIP path with `text_model.`; `alpha` the stored
    alpha (None: none stored).
    """

    component: str
    path: str
    kind: str
    factors: Mapping[str, torch.Tensor]
    scale: float
    scale_from: str  # "alpha key", "adapter config", "none: scale 1.0" or "LoKr without a low-rank factor: 1.0"
    alpha: float | None = None

    @classmethod
    def lora(cls, component: str, path: str, down: torch.Tensor, up: torch.Tensor, scale: float,
             scale_from: str = "alpha key") -> "AdapterModule":
        return cls(component, path, "lora", {"lora_down.weight": down, "lora_up.weight": up}, scale, scale_from,
                   scale * down.shape[0])

    @property
    def down(self) -> torch.Tensor:  # [r, in] or [r, in, kh, kw]
        return self.factors["lora_down.weight"]

    @property
    def up(self) -> torch.Tensor:  # [out, r] or [out, r, 1, 1]
        return self.factors["lora_up.weight"]

    @property
    def rank(self) -> int | None:
        """LoRA / LoHa rank; a LoKr module's low-rank factor's rank, None when both factors are whole."""
        shapes = {("down" if s == "lora_down.weight" else s): tuple(f.shape) for s, f in self.factors.items()}
        return alpha_rank(self.kind, shapes)

    @property
    def kohya_key(self) -> str:
        return kohya_name(UNET_PREFIX if self.component == "unet" else TEXT_ENCODER_PREFIX, self.path)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the model weight this module changes."""
        if self.kind == "lora":
            return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))
        delta = self.delta()  # LyCORIS factors may be stored flattened: the kernel then comes from the model
        kernel = self._kernel()
        if delta.dim() == 4 or kernel is None:
            return tuple(int(d) for d in delta.shape)
        out = int(delta.shape[0])
        return (out, delta.numel() // out // (kernel[0] * kernel[1]), *kernel)

    def _kernel(self) -> tuple[int, int] | None:
        if self.component != "unet":
            return None
        if _CONV3X3.fullmatch(self.path):
            return (3, 3)
        return (1, 1) if _CONV1X1.fullmatch(self.path) else None

    def delta(self) -> torch.Tensor:
        """scale * the module's product, fp32: LoRA shaped like the weight, LyCORIS as its factors give it."""
        from lora_offset import lowrank

        f = self.factors
        if self.kind == "lora":
            return lowrank.lora_delta(f["lora_down.weight"], f["lora_up.weight"], self.scale)
        if self.kind == "loha":
            return lowrank.loha_delta(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], self.scale,
                                      f.get("hada_t1"), f.get("hada_t2"))
        w1 = lowrank.lokr_factor(f.get("lokr_w1"), f.get("lokr_w1_a"), f.get("lokr_w1_b"))
        w2 = lowrank.lokr_factor(f.get("lokr_w2"), f.get("lokr_w2_a"), f.get("lokr_w2_b"), f.get("lokr_t2"))
        return lowrank.lokr_delta(w1, w2, self.scale)

    def weight_delta(self) -> torch.Tensor:
        """The delta shaped like the model weight (`weight_shape`)."""
        return self.delta().reshape(self.weight_shape)
