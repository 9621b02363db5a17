"""kohya recipes through the real command line on the tiny model: the options of issue 11."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lora_offset.cli import main
from tests.test_train import make_images, write_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "10_sks dog", 4)


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_huber_loss_debiased_estimation_and_a_timestep_range(tmp_path, tiny_model_dir, images, monkeypatch):
    from lora_offset.training import noise

    drawn = []
    real = noise.sample_timesteps

    def recording(*args, **kwargs):
        timesteps = real(*args, **kwargs)
        drawn.append(timesteps.clone())
        return timesteps

    monkeypatch.setattr(noise, "sample_timesteps", recording)
    config = write_config(tmp_path, tiny_model_dir, images,
                          training={"max_steps": 3, "loss_type": "huber", "huber_schedule": "exponential",
                                    "huber_c": 0.2, "debiased_estimation": True},
                          noise={"min_snr_gamma": 5.0, "min_timestep": 100, "max_timestep": 200})
    assert main(["train", "--config", str(config)]) == 0
    drawn = torch.cat(drawn)
    assert len(drawn) == 3 * 2 and drawn.min() >= 100 and drawn.max() < 200
    meta = metadata(tmp_path / "out" / "tiny.safetensors")
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "exponential", "0.2")
    assert meta["ss_debiased_estimation"] == "True" and meta["ss_min_snr_gamma"] == "5.0"
    assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == ("100", "200")


@pytest.mark.parametrize("sets, message", [
    (["noise.min_timestep=500", "noise.max_timestep=500"], "0 <= min_timestep < max_timestep <= 1000"),
    (["noise.max_timestep=1001"], "0 <= min_timestep < max_timestep <= 1000"),
    (["training.huber_c=0"], "training.huber_c must be in (0, 1]"),
    (["training.loss_type='l3'"], "training.loss_type must be one of 'l2' | 'l1' | 'huber' | 'smooth_l1'"),
    (["training.huber_schedule='linear'"], "training.huber_schedule must be one of"),
])
def test_bad_loss_and_timestep_settings_are_one_error(tmp_path, images, sets, message, capsys):
    config = write_config(tmp_path, tmp_path / "no-model", images)
    assert main(["train", "--config", str(config)] + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model" not in err
