"""Optimizers and the learning-rate schedule: a registry from the config's name to the library class.

Every optimizer is a well-kept library's (bitsandbytes, torch, prodigyopt, transformers,
schedulefree); lora-offset only chooses its defaults, builds the parameter groups and checks
`training.optimizer_args` against the class's constructor before anything heavy runs.

Parameter groups: the UNet LoRA at `learning_rate` (with kohya's block lr weights, one group per
UNet block at learning_rate x its weight), the text-encoder LoRA at `text_encoder_lr`; with LoRA+
(`network.loraplus_lr_ratio`) each is split into its down (lora_A) and up (lora_B) matrices, the
up ones at lr x ratio (Hayou et al. 2024; kohya's loraplus_lr_ratio). An adaptive
optimizer (Prodigy) estimates one step size for everything it holds: it gets one group.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_offset.errors import UserError

log = logging.getLogger("lora_offset")


@dataclass(frozen=True)
class OptimizerSpec:
    path: str  # "module.Class", imported only when used
    defaults: dict[str, Any] = field(default_factory=dict)  # keywords we set; optimizer_args override them
    adaptive: bool = False  # finds its own step size (learning_rate ~ 1 scales it): one parameter group
    schedule_free: bool = False  # schedules itself; needs .train() / .eval() around training and saving
    fused_on_cuda: bool = False  # torch's fused kernel when every parameter is on a GPU


# training.optimizer -> the class that implements it
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw8bit": OptimizerSpec("bitsandbytes.optim.AdamW8bit"),
    "adamw": OptimizerSpec("torch.optim.AdamW", fused_on_cuda=True),
    # Paged: optimizer state in CUDA unified memory, paged to the CPU under memory pressure (plain on a CPU).
    "pagedadamw8bit": OptimizerSpec("bitsandbytes.optim.PagedAdamW8bit"),
    "lion8bit": OptimizerSpec("bitsandbytes.optim.Lion8bit"),
    "lion": OptimizerSpec("bitsandbytes.optim.Lion"),
    "prodigy": OptimizerSpec("prodigyopt.Prodigy", adaptive=True),
    # The LoRA recipe's Adafactor: a fixed learning rate (transformers' default would ignore it).
    "adafactor": OptimizerSpec("transformers.optimization.Adafactor",
                               defaults={"scale_parameter": False, "relative_step": False, "warmup_init": False}),
    "adamw_schedulefree": OptimizerSpec("schedulefree.AdamWScheduleFree", schedule_free=True),
}
# Set by their own config keys, never through optimizer_args.
RESERVED_ARGS = {"params": "the LoRA parameters", "lr": "training.learning_rate",
                 "weight_decay": "training.weight_decay"}


def optimizer_class(name: str) -> type:
    module, _, cls = OPTIMIZERS[name].path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        package = module.partition(".")[0]
        raise UserError(f"training.optimizer = {name!r} needs the package {package} ({e}): "
                        f"pip install {package}") from None


def class_name(name: str) -> str:
    """`module.Class` of the implementing class as kohya records it in ss_optimizer."""
    cls = optimizer_class(name)
    return f"{cls.__module__}.{cls.__name__}"


def check_optimizer_args(name: str, optimizer_args: dict[str, Any]) -> dict[str, Any]:
    """The constructor keywords for `name`: its defaults, then `optimizer_args`, checked against the signature."""
    cls = optimizer_class(name)
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = [n for n, p in parameters.items() if n != "self" and n not in RESERVED_ARGS
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in optimizer_args:
        if key in RESERVED_ARGS:
            raise UserError(f"training.optimizer_args.{key}: set {RESERVED_ARGS[key]} instead")
        if key not in accepted and not takes_any:
            import difflib

            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"it takes: {', '.join(accepted)}"
            raise UserError(f"training.optimizer_args.{key}: {cls.__module__}.{cls.__name__} has no argument "
                            f"'{key}'; {hint}")
        wanted = _wanted_type(optimizer_args[key], parameters[key].default) if key in parameters else None
        if wanted is not None:
            raise UserError(f"training.optimizer_args.{key} = {_toml(optimizer_args[key])}: {cls.__module__}."
                            f"{cls.__name__} takes {wanted} for {key} (its default: {_toml(parameters[key].default)})"
                            f"{_rewrite_hint(key, optimizer_args[key], parameters[key].default)}")
    kwargs = {**OPTIMIZERS[name].defaults, **optimizer_args}
    # TOML arrays arrive as lists; the libraries expect tuples (betas, eps).
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if name == "adafactor" and kwargs.get("relative_step"):
        raise UserError("training.optimizer_args.relative_step = true makes Adafactor ignore "
                        "training.learning_rate and run its own schedule, which lora-offset does not drive; "
                        "leave relative_step false and set training.learning_rate")
    return kwargs


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wanted_type(value, default) -> str | None:
    """What the argument takes, judged by the type of its default, when `value` is not that; else None.
    No default (or None) says nothing: the library's own check decides."""
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if _is_number(default):
        return None if _is_number(value) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (tuple, list)) and all(_is_number(d) for d in default):
        ok = isinstance(value, (tuple, list)) and len(value) == len(default) and all(_is_number(v) for v in value)
        return None if ok else f"a list of {len(default)} numbers"
    return None


def _toml(value) -> str:
    """`value` as it is written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _rewrite_hint(key: str, value, default) -> str:
    """'; write betas = [0.9, 0.99]' when a string holds what the argument takes (kohya's
    optimizer_args are strings: "betas=0.9,0.99"), else ''."""
    if not isinstance(value, str):
        return ""
    import tomllib

    text = value.strip()
    candidates = [text, "[" + text.strip("()[] ") + "]"] if isinstance(default, (tuple, list)) else [text.lower(), text]
    for candidate in candidates:
        try:
            parsed = tomllib.loads(f"v = {candidate}")["v"]
        except (tomllib.TOMLDecodeError, ValueError):
            continue
        if not isinstance(parsed, str) and _wanted_type(parsed, default) is None:
            kind = "a TOML array" if isinstance(parsed, list) else "no quotes"
            return f"; write {key} = {_toml(parsed)} ({kind}, not a string)"
    return ""


def param_groups(name: str, unet_params: dict[str, torch.nn.Parameter], te_params: dict[str, torch.nn.Parameter],
                 learning_rate: float, text_encoder_lr: float | None, loraplus_lr_ratio: float | None,
                 block_lr_weights: list[float] | None = None) -> list[dict]:
    """Parameter groups (see the module docstring). `*_params`: {name: parameter} of each LoRA.
    `block_lr_weights`: kohya's 25 block weights (network_targets.block_lr_weights); each UNet block is
    then a group at learning_rate x its weight (a module in no block: x 1)."""
    te_lr = learning_rate if text_encoder_lr is None else text_encoder_lr
    if OPTIMIZERS[name].adaptive:
        if loraplus_lr_ratio:
            raise UserError(f"network.loraplus_lr_ratio needs a learning rate per group; {name} adapts one step "
                            "size for all parameters: remove loraplus_lr_ratio or choose another optimizer")
        if block_lr_weights is not None:
            raise UserError(f"network.down_lr_weight / mid_lr_weight / up_lr_weight need a learning rate per block; "
                            f"{name} adapts one step size for all parameters: remove them or choose another optimizer")
        if te_params and te_lr != learning_rate:
            log.warning("training.text_encoder_lr is ignored with %s: it adapts one step size for the UNet and "
                        "the text encoder together (one parameter group at training.learning_rate)", name)
        if learning_rate != 1.0:
            log.warning("training.learning_rate = %g with %s: it multiplies the step size %s finds itself; "
                        "1.0 is the usual value", learning_rate, name, name)
        return [{"params": list(unet_params.values()) + list(te_params.values()), "lr": learning_rate}]
    groups = []
    for params, lr in (*_block_parts(unet_params, learning_rate, block_lr_weights), (te_params, te_lr)):
        if not params:
            continue
        if loraplus_lr_ratio:
            down = [p for n, p in params.items() if "lora_B" not in n]
            up = [p for n, p in params.items() if "lora_B" in n]
            groups += [{"params": down, "lr": lr}, {"params": up, "lr": lr * loraplus_lr_ratio}]
        else:
            groups.append({"params": list(params.values()), "lr": lr})
    return groups


def _block_parts(params: dict[str, torch.nn.Parameter], lr: float, weights: list[float] | None):
    """[(params, lr)]: all at `lr`, or one part per kohya block at lr x its weight, in block order."""
    if weights is None:
        return [(params, lr)]
    from lora_offset.training.network_targets import block_index

    parts: dict[int | None, dict] = {}
    for key, p in params.items():
        parts.setdefault(block_index(key), {})[key] = p
    order = sorted(parts, key=lambda b: -1 if b is None else b)
    return [(parts[b], lr * (1.0 if b is None else weights[b])) for b in order]


def make_optimizer(name: str, groups: list[dict], weight_decay: float,
                   optimizer_args: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    spec = OPTIMIZERS[name]
    kwargs = {"weight_decay": weight_decay, **check_optimizer_args(name, optimizer_args or {})}
    if spec.fused_on_cuda:
        # one kernel for the whole update on CUDA (LoRA weights are fp32, which it requires)
        kwargs.setdefault("fused", all(p.is_cuda for g in groups for p in g["params"]) or None)
    try:
        optimizer = optimizer_class(name)(groups, **kwargs)
    except (TypeError, ValueError) as e:  # the library's own check of a value
        raise UserError(f"training.optimizer_args: {name} refused them: {e}") from None
    if spec.schedule_free:
        optimizer.train()
    return optimizer


# training.lr_scheduler: diffusers' schedules (diffusers.optimization.SchedulerType), each built by
# make_lr_scheduler from the keys lora-offset has; piecewise_constant needs step rules, which it has not.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
UNSUPPORTED_LR_SCHEDULERS = {
    "piecewise_constant": "needs diffusers' step rules, which lora-offset has no key for; use \"constant_with_warmup\" "
                          "or \"cosine_with_restarts\"",
}


def warmup_steps(lr_warmup_steps: float, max_steps: int) -> int:
    """training.lr_warmup_steps: a number of steps, or a fraction of max_steps when below 1 (kohya's)."""
    if 0 < lr_warmup_steps < 1:
        return int(lr_warmup_steps * max_steps)
    return int(lr_warmup_steps)


def make_lr_scheduler(t, optimizer, max_steps: int):
    """The diffusers learning-rate schedule of TrainingConfig `t` over `max_steps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(t.lr_warmup_steps, max_steps),
                         num_training_steps=max_steps, num_cycles=t.lr_scheduler_num_cycles,
                         power=t.lr_scheduler_power)


class schedule_free_eval:
    """Context: a schedule-free optimizer's averaged weights (x) in the parameters while saving or sampling.

    Training continues from exactly the weights it had (a copy is put back rather than interpolated
    back, which would not round-trip bit for bit): saves do not change the run, and resume stays exact.
    """

    def __init__(self, name: str, optimizer, params: list[torch.nn.Parameter]):
        self.active = OPTIMIZERS[name].schedule_free
        self.optimizer, self.params = optimizer, params

    def __enter__(self):
        if self.active:
            self.saved = [p.detach().clone() for p in self.params]
            self.optimizer.eval()
        return self

    def __exit__(self, *exc):
        if self.active:
            with torch.no_grad():
                for p, saved in zip(self.params, self.saved):
                    p.copy_(saved)
            for group in _inner(self.optimizer).param_groups:
                group["train_mode"] = True
        return False


def _inner(optimizer):
    """The library optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)
