"""Resumable training state: everything needed to continue bit-identically, saved, found and loaded.

A state file (`{output_dir}/state/state-{step:08d}.pt`, the last KEEP_STATES kept) holds the LoRA
weights, the optimizer's and the lr schedule's state, every random generator, the step and, with
training.ema_decay, the moving average of the weights (ema.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lora_offset.errors import UserError
from lora_offset.fileio import atomic_path
from lora_offset.training.networks import is_adapter_parameter

STATE_DIR = "state"
STATE_PREFIX = "state-"
KEEP_STATES = 2


def lora_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights (LoRA, LoHa or LoKr), by parameter name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if is_adapter_parameter(n)}


def save_state(output_dir: Path, step: int, started_at: float, unet, text_encoder, optimizer, lr_scheduler,
               generator, accelerator, optimizer_name: str, ema=None) -> Path:
    """Everything needed to continue bit-identically: LoRA weights, optimizer, schedule, RNG, step, EMA."""
    state = {
        "step": step,
        "optimizer_name": optimizer_name,
        "started_at": started_at,
        "unet_lora": lora_state(accelerator.unwrap_model(unet)),
        "text_encoder_lora": lora_state(accelerator.unwrap_model(text_encoder)),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": list(random.getstate()[1]),
        "num_threads": torch.get_num_threads(),  # CPU float results depend on it (see determinism.py)
        "ema": ema.state_dict() if ema is not None else None,
    }
    folder = output_dir / STATE_DIR
    path = folder / f"{STATE_PREFIX}{step:08d}.pt"
    # Through a Python file object, so that a full disk surfaces as OSError(ENOSPC), not as an opaque
    # torch RuntimeError; the size hint names the space needed.
    with atomic_path(path, size_hint=tensor_bytes(state) + (1 << 16)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    for old in sorted(folder.glob(f"{STATE_PREFIX}*.pt"))[:-KEEP_STATES]:
        old.unlink(missing_ok=True)
    return path


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in a nested dict/list/tuple (what torch.save writes, give or take a header)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def saved_num_threads(path: Path) -> int | None:
    """The intra-op thread count of the run that saved the state at `path` (None: unknown, or unreadable)."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("num_threads")
    except Exception:  # load_state reports an unreadable state
        return None
    return int(value) if value else None


def find_resume_state(resume: str, output_dir: Path) -> Path:
    """`latest` (newest state in output_dir), a state folder, an output folder, or a state file."""
    candidates = {"latest": output_dir / STATE_DIR}.get(resume, Path(resume))
    if candidates.is_dir():
        folder = candidates / STATE_DIR if (candidates / STATE_DIR).is_dir() else candidates
        states = sorted(folder.glob(f"{STATE_PREFIX}*.pt"))
        if not states:
            raise UserError(f"--resume {resume}: no saved training state in {folder} "
                            f"(states are written every training.save_state_every_steps steps)")
        return states[-1]
    if candidates.is_file():
        return candidates
    raise UserError(f"--resume {resume}: {candidates} does not exist")


def load_state(path: Path, unet, text_encoder, optimizer, lr_scheduler, generator, accelerator,
               optimizer_name: str, ema=None) -> tuple[int, float]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which
        raise UserError(f"--resume: {path} is not a readable lora-offset training state ({type(e).__name__})") from None
    for key, model in (("unet_lora", unet), ("text_encoder_lora", text_encoder)):
        params = dict(accelerator.unwrap_model(model).named_parameters())
        saved = state[key]
        current = {n for n in params if is_adapter_parameter(n)}
        if set(saved) != current:
            raise UserError(f"--resume: {path} was saved with a different network (rank, conv or text encoder "
                            "settings differ from this config)")
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)
    saved_optimizer = state.get("optimizer_name", optimizer_name)  # states written before the name was kept
    if saved_optimizer != optimizer_name:
        raise UserError(f"--resume: {path} was saved by training.optimizer = {saved_optimizer!r}, this config uses "
                        f"{optimizer_name!r}: the optimizer state cannot carry over; use the same optimizer")
    if len(state["optimizer"]["param_groups"]) != len(optimizer.param_groups):
        raise UserError(f"--resume: {path} has {len(state['optimizer']['param_groups'])} optimizer parameter "
                        f"groups, this config {len(optimizer.param_groups)}: the text encoder or "
                        "network.loraplus_lr_ratio settings differ from the run that saved it")
    saved_ema = state.get("ema")
    if (saved_ema is None) != (ema is None):
        raise UserError(f"--resume: {path} was saved " + ("without" if saved_ema is None else "with") + " an EMA of the "
                        "weights and this config has " + ("training.ema_decay" if ema is not None else "none") +
                        ": resume with the run's own training.ema_decay setting")
    if ema is not None:
        ema.load_state_dict(saved_ema, str(path))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    return int(state["step"]), float(state["started_at"])
