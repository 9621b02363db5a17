"""training.deterministic: what it sets, and that it puts everything back. (The promise itself, bit-identical
runs and resumes in a user's default settings, is tested end to end in test_robustness.py.)"""

import logging
import os

import torch

from lora_offset.training import determinism

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_a_resume_takes_the_thread_count_its_run_started_with_and_says_so(caplog):
    before = torch.get_num_threads()
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        restore = determinism.configure(None, CPU, saved_num_threads=before + 1)
    try:
        assert torch.get_num_threads() == before + 1
    finally:
        restore()
    assert torch.get_num_threads() == before
    assert [r.getMessage() for r in caplog.records] == [
        f"resuming with {before + 1} CPU threads, as the run that saved the state (this process would use {before}): "
        "a different count gives different bits; training.deterministic = false uses this process's count instead"]


def test_a_fresh_run_or_the_same_count_changes_nothing(caplog):
    before = torch.get_num_threads()
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        for saved in (None, before):
            determinism.configure(None, CPU, saved_num_threads=saved)()
            assert torch.get_num_threads() == before
    assert caplog.records == []


def test_off_leaves_the_thread_count_to_the_process():
    before = torch.get_num_threads()
    determinism.configure(False, CPU, saved_num_threads=before + 1)
    assert torch.get_num_threads() == before


def test_on_a_gpu_it_is_off_by_default_and_when_on_sets_the_cuda_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    determinism.configure(None, CUDA, saved_num_threads=None)()  # default on a GPU: off
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    benchmark = torch.backends.cudnn.benchmark
    restore = determinism.configure(True, CUDA, saved_num_threads=None)
    try:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        restore()
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark == benchmark
