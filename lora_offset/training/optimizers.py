"""Optimizers: a registry from the config's name to the library class that implements it."""

from __future__ import annotations

import importlib

import torch

# training.optimizer -> the class, "module.path.ClassName" (imported only when used; recorded as ss_optimizer)
OPTIMIZER_CLASSES = {"adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit", "adamw": "torch.optim.adamw.AdamW"}


def optimizer_class(name: str) -> type:
    module, _, cls = OPTIMIZER_CLASSES[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)


def make_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    kwargs = {"weight_decay": weight_decay}
    if name == "adamw":
        # fused: one kernel for the whole update on CUDA (LoRA weights are fp32, which it requires)
        kwargs["fused"] = all(p.is_cuda for g in groups for p in g["params"]) or None
    return optimizer_class(name)(groups, **kwargs)
