"""The console of each command, as a user's shell shows it: no library notice a user cannot act on,
no library progress bar nested in ours, and real warnings of the same loggers still show."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_offset import quiet
from tests.test_train import make_images, write_config

ROOT = Path(__file__).resolve().parents[1]
# A user's shell: no verbosity settings of the test set-up (conftest quiets diffusers and transformers).
ENV = {**{k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")},
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
LIBRARY_BARS = ("Loading weights", "Writing model shards", "Loading pipeline components", "Fetching")


def console(*argv: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "lora_offset", *argv], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def assert_clean(output: str) -> None:
    for notices in quiet.NOTICES.values():
        for start in notices:
            assert start not in output, output
    for bar in LIBRARY_BARS:
        assert bar not in output, output
    assert "Traceback" not in output and "Warning:" not in output, output


@pytest.mark.parametrize("logger_name", list(quiet.NOTICES))
def test_each_notice_is_dropped_and_the_loggers_other_warnings_are_not(logger_name):
    """Through the logger's own filters (the libraries set their own levels and handlers, which the
    test set-up quiets: the filter is what decides)."""
    quiet.install_filters()
    quiet.install_filters()  # idempotent: one filter per logger
    logger = logging.getLogger(logger_name)
    assert sum(isinstance(f, quiet._DropNotices) for f in logger.filters) == 1

    def passes(message: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger_name, logging.WARNING, __file__, 1, message, (), None)))

    for start in quiet.NOTICES[logger_name]:
        assert not passes(f"{start}, and what the library says after it")
    assert passes(f"a real warning of {logger_name}")


def test_help_train_eval_merge_print_no_library_notice(tmp_path, tiny_model_dir):
    assert_clean(console("--help", cwd=tmp_path))
    images = make_images(tmp_path / "img", 2)
    config = write_config(tmp_path, tiny_model_dir, images, training={"max_steps": 1})
    output = console("train", "--config", str(config), cwd=tmp_path)
    assert_clean(output)
    adapter = tmp_path / "out" / "tiny.safetensors"
    assert f"saved {adapter}" in output
    output = console("eval", "--base", str(tiny_model_dir), "--lora", str(adapter), "--prompt", "a photo", "--n", "1",
                     "--steps", "1", "--resolution", "64", "--out", str(tmp_path / "eval"), cwd=tmp_path)
    assert_clean(output)
    assert "[tiny] 1 images of 'a photo'" in output
    output = console("merge", "--base", str(tiny_model_dir), "--lora", str(adapter), "--out",
                     str(tmp_path / "merged.safetensors"), cwd=tmp_path)
    assert_clean(output)
    assert "wrote" in output


@pytest.mark.slow
def test_demo_quick_with_two_jobs_prints_its_stages_and_no_library_notice(tmp_path):
    output = console("demo", "--quick", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert_clean(output)
    assert "setup: base model, data and configs" in output and "eval control: done" in output
    for log in (tmp_path / "demo" / "logs").glob("*.log"):  # each job's own output: clean too
        assert_clean(log.read_text(errors="replace"))
    import json

    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    jobs = set(report["timings_s"]) - {"setup", "total"}
    assert set(report["cpu_s"]) == jobs and all(v > 0 for v in report["cpu_s"].values())  # each forked job's CPU
    assert "CPU time of each job (s; one thread each): classes" in (tmp_path / "demo" / "report.md").read_text()
