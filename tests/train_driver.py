"""`lora-offset train` with test-only interruptions, so that a kill lands exactly where a test wants it.

    python -m tests.train_driver train --config my.toml [--resume latest]

Nothing here is in the package: the driver patches a few standard functions, then runs the real CLI.

PAUSE_AT (optional) says where to stop, print `PAUSED <where>` and wait to be killed:
  save:NAME   inside the save of file NAME (a state or an adapter): its temporary file is written and
              fsynced, the rename onto NAME has not happened
  step:N      in optimizer step N (1-based, counted over the whole run), after the backward pass, before
              the weights change
  resume      while the state to resume from is being read

DISK_FULL_AT=save:NAME (optional; tests in-process call install_disk_full) makes the save of file NAME meet a full disk: with FILL_FILE set (a
path on a small file system), that file grows until the file system is full as the save starts; without
it, the save's temporary file points at /dev/full (the kernel's ENOSPC for every writer that writes
through it; safetensors', which replaces the link, raises the error it raises on a full disk).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path


def pause(where: str) -> None:
    print(f"PAUSED {where}", flush=True)
    while True:
        time.sleep(1)


def install_pauses(spec: str) -> None:
    kind, _, arg = spec.partition(":")
    if kind == "save":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == arg:
                pause(spec)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif kind == "step":
        import torch

        real_backward = torch.Tensor.backward
        calls = {"n": 0, "first": None}

        def backward(self, *args, **kwargs):
            real_backward(self, *args, **kwargs)
            if calls["first"] is None:
                calls["first"] = first_step()
            calls["n"] += 1
            if calls["first"] + calls["n"] == int(arg):
                pause(spec)

        torch.Tensor.backward = backward
    elif kind == "resume":
        import torch

        real_load = torch.load

        def load(f, *args, **kwargs):
            if Path(str(f)).name.startswith("state-"):
                pause(spec)
            return real_load(f, *args, **kwargs)

        torch.load = load
    else:
        raise SystemExit(f"train_driver: unknown PAUSE_AT {spec!r}")


def first_step() -> int:
    """Steps already done by the run being resumed (the number in the newest state's name), else 0."""
    if "--resume" not in sys.argv:
        return 0
    from lora_offset.config import load_config

    config = load_config(sys.argv[sys.argv.index("--config") + 1])
    states = sorted((Path(config.training.output_dir) / "state").glob("state-*.pt"))
    return int(states[-1].stem.split("-")[1]) if states else 0


def install_disk_full(spec: str, fill: str | None = None, patch=setattr) -> None:
    """DISK_FULL_AT (see above); in-process tests pass monkeypatch.setattr as `patch` to undo it afterwards."""
    name = spec.partition(":")[2]
    real_mkstemp = tempfile.mkstemp

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        fd, path = real_mkstemp(suffix, prefix, dir, text)
        if prefix == f".{name}.":
            if fill:
                fill_file_system(Path(fill))
            else:
                os.close(fd)
                os.unlink(path)
                os.symlink("/dev/full", path)
                fd = os.open(path, os.O_WRONLY)
        return fd, path

    patch(tempfile, "mkstemp", mkstemp)
    if not fill:
        # safetensors' writer replaces a symlink instead of writing through it: give it the error it
        # raises on a full disk (its message, as seen on a full tmpfs).
        import safetensors
        import safetensors.torch

        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if Path(filename).name.startswith(f".{name}."):
                raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                                  "(os error 28)")
            return real_save_file(tensors, filename, *args, **kwargs)

        patch(safetensors.torch, "save_file", save_file)


def fill_file_system(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 1 << 12, 1):  # big blocks, then what is left to the byte
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    print(f"FILLED {path}", flush=True)


if __name__ == "__main__":
    if os.environ.get("PAUSE_AT"):
        install_pauses(os.environ["PAUSE_AT"])
    if os.environ.get("DISK_FULL_AT"):
        install_disk_full(os.environ["DISK_FULL_AT"], os.environ.get("FILL_FILE"))
    from lora_offset.cli import main

    sys.exit(main(sys.argv[1:]))
