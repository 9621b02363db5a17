"""Where the training curves and sample images go: TensorBoard, Weights & Biases, both, or nowhere.

training.log_with = "tensorboard" (default) | "wandb" | "all" (both) | "none". wandb is an optional
extra (`pip install 'lora-offset[wandb]'`). It logs online only when it can: WANDB_MODE set by the
user wins; otherwise a run without an API key (WANDB_API_KEY or `wandb login`) or without a
connection to the wandb server is logged offline, into {logging_dir}/wandb, for `wandb sync` later.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from pathlib import Path

from lora_offset.errors import UserError

log = logging.getLogger("lora_offset")

TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}
WANDB_HOST = "api.wandb.ai"


def trackers(log_with: str) -> list[str]:
    """accelerate's log_with for training.log_with; a UserError when wandb is asked for and missing."""
    names = TRACKERS[log_with]
    if "wandb" in names:
        try:  # an import, not a look-up: a wandb that is there but cannot load fails here too, not mid-run
            importlib.import_module("wandb")
        except ImportError as e:
            missing = isinstance(e, ModuleNotFoundError) and e.name == "wandb"
            why = "" if missing else f" (it is installed but does not import: {e})"
            raise UserError(f"training.log_with = {log_with!r} needs the wandb package{why}: pip install "
                            "'lora-offset[wandb]' (or pip install wandb), or set training.log_with = "
                            "\"tensorboard\"") from None
    return names


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators(WANDB_HOST) is not None  # what `wandb login` writes
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> str:
    """"online" when wandb can log online, else "offline" (see the module docstring)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not _has_api_key():
        return "offline"
    return "online" if _reachable(WANDB_HOST) else "offline"


def init_kwargs(log_with: str, run_name: str | None, logging_dir: Path) -> dict:
    """accelerate init_trackers' init_kwargs: the wandb run's name, folder and mode."""
    if "wandb" not in TRACKERS[log_with]:
        return {}
    mode = wandb_mode()
    logging_dir.mkdir(parents=True, exist_ok=True)
    if mode == "offline":
        log.info("wandb: no API key or no connection: logging offline into %s (upload later with `wandb sync`)",
                 logging_dir / "wandb")
    return {"wandb": {"name": run_name, "dir": str(logging_dir), "mode": mode}}


def log_images(accelerator, images: list, step: int) -> None:
    """Sample images to every tracker that takes images."""
    import numpy as np

    names = [getattr(t, "name", "") for t in accelerator.trackers]
    if "tensorboard" in names:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for i, image in enumerate(images):
            writer.add_image(f"sample/{i}", np.asarray(image), global_step=step, dataformats="HWC")
    if "wandb" in names:
        accelerator.get_tracker("wandb").log_images({"samples": images}, step=step)
