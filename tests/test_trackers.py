"""training.log_with: TensorBoard, wandb (offline without a key or a network), both, or none."""

from __future__ import annotations

import pytest

from lora_offset.cli import main
from lora_offset.training import trackers
from tests.test_train import make_images, write_config


@pytest.fixture()
def no_wandb_account(tmp_path, monkeypatch):
    """No key, no `wandb login` (netrc), no WANDB_MODE: as on a fresh machine."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_mode(no_wandb_account, monkeypatch):
    monkeypatch.setattr(trackers, "_reachable", lambda host, timeout=2.0: True)
    assert trackers.wandb_mode() == "offline"  # no key: offline whatever the network
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert trackers.wandb_mode() == "online"
    monkeypatch.setattr(trackers, "_reachable", lambda host, timeout=2.0: False)
    assert trackers.wandb_mode() == "offline"  # a key but no network
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode() == "disabled"  # the user's choice wins


def test_missing_wandb_is_one_clear_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a package that is not there: ImportError
    images = make_images(tmp_path / "img", 2)
    config = write_config(tmp_path, tiny_model_dir, images, training={"log_with": "wandb"})
    assert main(["train", "--config", str(config)]) == 2
    assert "training.log_with = 'wandb' needs the wandb package: pip install 'lora-offset[wandb]'" in \
        capsys.readouterr().err


def test_a_wandb_that_does_not_import_says_why(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def broken(name, *args, **kwargs):  # wandb there but broken (e.g. a protobuf it cannot use); wandb itself untouched
        if name == "wandb":
            raise ImportError("cannot import name 'x' from 'protobuf'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken)
    images = make_images(tmp_path / "img", 2)
    config = write_config(tmp_path, tiny_model_dir, images, training={"log_with": "wandb"})
    assert main(["train", "--config", str(config)]) == 2
    assert ("training.log_with = 'wandb' needs the wandb package (it is installed but does not import: cannot "
            "import name 'x' from 'protobuf'): pip install 'lora-offset[wandb]'") in capsys.readouterr().err


def test_log_with_none_writes_no_logs(tmp_path, tiny_model_dir):
    images = make_images(tmp_path / "img", 2)
    config = write_config(tmp_path, tiny_model_dir, images, training={"max_steps": 1, "log_with": "none"})
    assert main(["train", "--config", str(config)]) == 0
    assert (tmp_path / "out" / "tiny.safetensors").exists() and not (tmp_path / "out" / "logs").exists()


@pytest.mark.slow  # wandb starts its own service process
def test_log_with_all_writes_tensorboard_and_an_offline_wandb_run(tmp_path, tiny_model_dir, no_wandb_account):
    pytest.importorskip("wandb")  # in the dev extra; lora-offset itself needs it only for log_with wandb/all
    images = make_images(tmp_path / "img", 2)
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "max_steps": 2, "log_with": "all", "wandb_run_name": "sks-dog-test", "sample_every_steps": 2,
        "sample_prompts": ["sks dog"], "sample_steps": 2})
    assert main(["train", "--config", str(config)]) == 0
    import wandb

    # wandb's service process writes the run's records as it closes, which it does when the Python
    # process exits (wandb.teardown at exit): do that here, where pytest's process goes on.
    wandb.teardown()
    logs = tmp_path / "out" / "logs"
    assert list(logs.rglob("events.out.tfevents.*"))
    runs = list((logs / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the run's records, for `wandb sync`
    records = next(runs[0].glob("run-*.wandb")).read_bytes()  # protobuf records: strings are stored as is
    assert b"sks-dog-test" in records and b"loss" in records
    assert list(runs[0].glob("files/media/images/samples_2_*.png"))  # the sample image at step 2
