"""Atomic writes: the new file or the old one, never a torn one; normal permissions; no leftovers."""

import os
import stat
from pathlib import Path

import pytest

from lora_offset.errors import UserError
from lora_offset.fileio import (DiskFullError, atomic_path, atomic_write_bytes, atomic_write_text, is_disk_full,
                                remove_interrupted_writes)


def test_new_file_gets_the_umask_mode_not_mkstemp_private_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "adapter.safetensors", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == b"data"


def test_failure_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out" / "lora.safetensors"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["lora.safetensors"]


def test_replace_is_complete_and_creates_missing_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["c.txt"]


def test_a_full_disk_raises_one_user_error_naming_folder_and_size_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out" / "lora.safetensors"
    atomic_write_text(target, "old")
    with pytest.raises(DiskFullError) as info:
        with atomic_path(target, size_hint=3 << 20) as tmp:
            with open("/dev/full", "wb") as full:  # the kernel's real ENOSPC
                full.write(b"x" * 8192)
            tmp.write_text("half written")
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert message.startswith(f"no space left in '{target.parent}' to write lora.safetensors: it needs about 3.0 MiB, ")
    assert message.endswith(" MiB free; free some space")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["lora.safetensors"]


def test_disk_full_is_recognised_through_torch_and_safetensors_errors():
    import torch

    for buffering in (0, -1):  # the OSError comes straight, or as the context of torch's RuntimeError
        with pytest.raises(Exception) as info:
            with open("/dev/full", "wb", buffering=buffering) as f:
                torch.save({"w": torch.zeros(100_000)}, f)
        assert is_disk_full(info.value)
    # safetensors' Rust writer puts the OS error in its message only (as seen on a full tmpfs).
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(RuntimeError("some other failure"))
    assert not is_disk_full(PermissionError(13, "Permission denied"))


def test_a_writer_failing_without_saying_why_on_a_disk_too_small_is_a_full_disk(tmp_path):
    with pytest.raises(DiskFullError):
        with atomic_path(tmp_path / "state.pt", size_hint=1 << 60):  # more than any disk has free
            raise RuntimeError("[enforce fail at inline_container.cc] file write failed")
    with pytest.raises(RuntimeError):  # with room to spare, the writer's own error stands
        with atomic_path(tmp_path / "state.pt", size_hint=1):
            raise RuntimeError("[enforce fail at inline_container.cc] file write failed")


def test_remove_interrupted_writes_removes_only_temporary_files_of_atomic_writes(tmp_path):
    import tempfile

    keep = ["lora.safetensors", ".hidden", "notes.tmp", ".lora.safetensors.tmp", ".a.b.toolong123.tmp"]
    for name in keep:
        (tmp_path / name).write_text("x")
    left = [tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_path)[1] for name in ("lora.safetensors", "state-00000002.pt")]
    (tmp_path / "sub").mkdir()
    removed = remove_interrupted_writes(tmp_path)
    assert removed == sorted(Path(p) for p in left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["sub"])
    assert remove_interrupted_writes(tmp_path / "missing") == []
