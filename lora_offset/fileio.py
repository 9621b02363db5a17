"""Atomic file writes: a kill at any moment leaves the old file or the new one, never a torn one.

Every output of the project (adapters, merged checkpoints, training state, sample images,
reports) goes through `atomic_write`: write to a temporary file in the same folder, flush,
fsync, then rename over the target (rename is atomic within one filesystem), then fsync the
folder so the rename itself survives a power cut. A full disk fails the write with one
DiskFullError naming the folder and the space needed, and leaves the old file as it was; a kill
before the rename leaves a temporary file that `remove_interrupted_writes` clears on the next start.
Any other OSError of a write becomes one UserError naming the target. `describe_os_error` turns an
OSError into the one line the command line prints; `output_problem` says before a command starts
why an output path cannot be written.
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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:  # named after the target, not the temporary file the user never asked for
        if is_disk_full(e):
            raise DiskFullError(target, size_hint, _free_bytes(target.parent) or 0) from e
        raise UserError(f"cannot write {target}: {os_error_reason(e)}") from None
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
            if isinstance(e, OSError) and e.filename in (None, str(tmp), str(target)):
                raise UserError(f"cannot write {target}: {os_error_reason(e)}") from None
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


# errno -> what went wrong, what to do: the one line an OSError becomes (describe_os_error).
_OS_ERRORS = {
    errno.EACCES: ("permission denied", "check the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "check the permissions or choose another path"),
    errno.EROFS: ("read-only file system", "choose a path on a writable disk"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "give the path of a file"),
    errno.EEXIST: ("already exists", "choose another path or remove it"),
    errno.ENOTEMPTY: ("the folder is not empty", "choose another path or empty it"),
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ELOOP: ("too many symbolic links", "check the path"),
    errno.EPIPE: ("broken pipe", "the program reading the output stopped before the end"),
}


def describe_os_error(error: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the path it concerns, what went wrong and what to do (no traceback)."""
    where = path if path is not None else error.filename if error.filename is not None else error.filename2
    return f"{where}: {os_error_reason(error)}" if where is not None else os_error_reason(error)


def os_error_reason(error: OSError) -> str:
    """What went wrong and what to do, for an OSError: 'permission denied; check the permissions ...'."""
    what, todo = _OS_ERRORS.get(error.errno, (error.strerror or str(error), "check the path"))
    return f"{what}; {todo}"


def output_problem(path: str | os.PathLike, kind: str) -> str | None:
    """Why `path` cannot be written as an output of `kind`, or None when it can; nothing is left on
    disk (a nameless probe file, O_TMPFILE where the system has it, tests the folder). `kind` "file":
    a file in an existing folder (the folder is not created: a mistyped folder is an error, not a
    surprise folder); "folder": an existing folder, or a new one, which the command creates with
    its missing parents."""
    path = Path(path)
    try:
        return _output_problem(path, kind)
    except OSError as e:  # a folder on the way that cannot be searched, ...
        return f"cannot write '{path}': {describe_os_error(e)}"


def _output_problem(path: Path, kind: str) -> str | None:
    if kind == "file":
        if path.is_dir():
            return f"'{path}' is a folder; give the path of a file to write"
        folder = path.parent
        if not folder.exists():
            above = _existing_ancestor(folder)
            if above is not None and not above.is_dir():
                return f"'{above}' is a file, not a folder; choose another path for '{path}'"
            return f"cannot write '{path}': the folder '{folder}' does not exist; create it first or choose another path"
    elif kind == "folder":
        if path.exists() and not path.is_dir():
            return f"'{path}' is a file; give the path of a folder (an existing one or a new one)"
        folder = _existing_ancestor(path)
        if folder is None:
            return None  # nothing of the path exists, not even its root: mkdir will say why
    else:
        raise ValueError(f"kind {kind!r}")
    if not folder.is_dir():
        return f"'{folder}' is a file, not a folder; choose another path for '{path}'"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            why = "is not writable (permission denied); choose another folder or change its permissions"
        elif e.errno == errno.EROFS:
            why = "is on a read-only file system; choose a folder on a writable disk"
        else:
            why = f"cannot be written: {os_error_reason(e)}"
        return f"cannot write '{path}': the folder '{folder}' {why}"
    return None


def check_readable(path: str | os.PathLike) -> None:
    """Raise the OSError that reading `path` meets (PermissionError, ...). Call it before a library that
    hides the reason: safetensors reports a file it may not read as "No such file or directory"."""
    with open(path, "rb"):
        pass


def _existing_ancestor(path: Path) -> Path | None:
    """`path` or its nearest ancestor that exists (as a file or a folder)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


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
