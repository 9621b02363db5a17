"""Atomic file writes: a kill at any moment leaves the old file or the new one, never a torn one.

Every output of the project (adapters, merged checkpoints, training state, sample images,
reports) goes through `atomic_write`: write to a temporary file in the same folder, flush,
fsync, then rename over the target (rename is atomic within one filesystem), then fsync the
folder so the rename itself survives a power cut. A full disk fails the write with one
DiskFullError naming the folder and the space needed, and leaves the old file as it was; a kill
before the rename leaves a temporary file that `remove_interrupted_writes` clears on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from lora_offset.errors import UserError

log = logging.getLogger("lora_offset")

# The temporary file of a write to NAME is `.NAME.XXXXXXXX.tmp` (mkstemp's 8 random characters).
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# How a full disk shows through writers that do not raise OSError: safetensors (Rust) and
# torch.save to a path (C++) put it in their message, if at all.
_DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class DiskFullError(UserError):
    """A write failed because its file system is full (or over quota). The target was left as it was."""

    def __init__(self, target: Path, needed: int | None, free: int):
        self.target, self.needed, self.free = target, needed, free
        needs = f"it needs about {format_size(needed)}, " if needed else ""
        super().__init__(f"no space left in '{target.parent}' to write {target.name}: {needs}"
                         f"{format_size(free)} free; free some space")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    Use it for writers that want a file name (safetensors' save_file, PIL's save, torch.save).
    On an exception the temporary file is removed and `path` is untouched; a write that failed
    because the disk is full raises DiskFullError, with `size_hint` (bytes) as the space needed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode any new file gets (0666 minus the
        # umask), or a web UI running as another user could not read the adapter.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, Exception) and not isinstance(e, UserError):
            free = _free_bytes(target.parent)
            if is_disk_full(e) or (size_hint is not None and free is not None and free < size_hint):
                raise DiskFullError(target, size_hint, free or 0) from e
        raise


def is_disk_full(error: BaseException) -> bool:
    """True when `error`, or an error it arose from, says the file system is full or over quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _DISK_FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def remove_interrupted_writes(*folders: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes killed before their rename (kill -9, power cut) left in
    `folders` (not their subfolders). Returns what was removed. Only for folders one process writes."""
    removed = []
    for folder in folders:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(folder):
                if _TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temporary file(s) of interrupted saves: %s", len(removed), ", ".join(map(str, removed)))
    return sorted(removed)


def format_size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], size_hint: int | None = None) -> Path:
    """Call `write(tmp_path)` and move the result atomically onto `path`. Returns `path`."""
    with atomic_path(path, size_hint) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size_hint=len(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # Directories cannot be opened for fsync on every platform (Windows): best effort.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
