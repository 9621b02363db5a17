"""An exponential moving average of the LoRA weights (training.ema_decay), kept beside the trained ones.

After each optimizer step that changed the weights, every averaged tensor moves towards its weight:

    e <- d_k * e + (1 - d_k) * w        (torch.lerp: e + (1 - d_k) * (w - e))

starting from the weights before the first step. d_k is training.ema_decay, or with training.ema_warmup
min(ema_decay, (1 + k) / (10 + k)) at the k-th update (k = 0, 1, ...: 0.1, 0.18, 0.25, ... up to the
decay), OneTrainer's and diffusers' warm-up, so that a short run is not an average dominated by the
starting adapter (with 0.999 the first 100 steps would otherwise keep 90 % of it).

Why not diffusers' EMAModel: it updates the average with `s - p` in one expression, which needs the
average and the weights on one device, so training.ema_on_cpu (the average in CPU memory while the
weights train on a GPU) cannot be done with it; and its warm-up counts from 1 where OneTrainer's counts
from 0. The update here is one lerp per tensor.

The average is part of the resumable state (state.py): a resumed run continues it bit for bit.
`swapped_in` puts the average into the model for a save or samples and puts the trained weights back
exactly (a copy, not arithmetic), so using the EMA never changes the training run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lora_offset.errors import UserError


def warmup_decay(decay: float, updates_before: int, warmup: bool) -> float:
    """The decay of an update after `updates_before` earlier ones."""
    if not warmup:
        return decay
    return min(decay, (1 + updates_before) / (10 + updates_before))


class LoraEMA:
    """The moving average of named parameters (`{name: parameter}`), on their device or on the CPU."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, warmup: bool = True,
                 on_cpu: bool = False):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params, self.decay, self.warmup = params, decay, warmup
        self.device = torch.device("cpu") if on_cpu else None
        self.average = {n: p.detach().to(self.device or p.device, torch.float32, copy=True) for n, p in params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - warmup_decay(self.decay, self.updates, self.warmup)
        for name, p in self.params.items():
            average = self.average[name]
            average.lerp_(p.detach().to(average.device, torch.float32), weight)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the block; the trained weights back, bit for bit, after."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.average[n].to(p.device, p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "average": {n: t.detach().cpu().clone() for n, t in self.average.items()}}

    def load_state_dict(self, state: dict, source: str) -> None:
        if set(state["average"]) != set(self.average):
            raise UserError(f"--resume: {source} holds an EMA of a different network (rank, conv or text encoder "
                            "settings differ from this config)")
        for n, value in state["average"].items():
            self.average[n].copy_(value)
        self.updates = int(state["updates"])


def make_ema(t, models: dict[str, torch.nn.Module]) -> LoraEMA | None:
    """The run's EMA of every adapter weight of `models` ({"unet": ..., "text_encoder": ...}), when
    training.ema_decay > 0; else None."""
    if not t.ema_decay:
        return None
    from lora_offset.training.networks import is_adapter_parameter

    params = {f"{key}.{n}": p for key, model in models.items() for n, p in model.named_parameters()
              if is_adapter_parameter(n) and p.requires_grad}
    return LoraEMA(params, t.ema_decay, warmup=t.ema_warmup, on_cpu=t.ema_on_cpu)


def ema_weights(ema: LoraEMA | None, averaged: bool):
    """A context with the EMA's weights in the model when `averaged` and there is an EMA; else nothing changes."""
    return ema.swapped_in() if ema is not None and averaged else contextlib.nullcontext()


def adapter_files(t, ema: LoraEMA | None, suffix: str) -> list[tuple[str, bool]]:
    """(file name, with the EMA's weights) of each adapter file a save writes: one file, the EMA's when there
    is one; with training.ema_save = "both", the trained weights under the usual name and the EMA's as -ema."""
    name = f"{t.output_name}{suffix}.safetensors"
    if ema is None:
        return [(name, False)]
    if t.ema_save == "both":
        return [(name, False), (f"{t.output_name}{suffix}-ema.safetensors", True)]
    return [(name, True)]
