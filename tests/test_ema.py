"""EMA of the LoRA weights: the exported adapter is a hand-computed EMA of the weights recorded after each
step; "both" writes the trained weights and the EMA; kill -9 and resume stay bit-identical with the EMA
(and the range monitor) on; its settings are checked."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_offset.cli import main
from lora_offset.config import Config
from lora_offset.errors import UserError
from lora_offset.training.ema import LoraEMA, adapter_files, warmup_decay
from tests.test_robustness import (assert_same_adapter, finish, output_of, start_training, temporaries, wait_for)
from tests.test_train import make_images, write_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "5_sks dog", 4)


def test_warmup_decay_is_onetrainers():
    assert [warmup_decay(0.999, k, True) for k in range(3)] == [1 / 10, 2 / 11, 3 / 12]
    assert warmup_decay(0.5, 100, True) == 0.5 and warmup_decay(0.999, 0, False) == 0.999


def test_update_by_hand_and_swapped_in_restores_the_trained_weights_bit_for_bit():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    ema = LoraEMA({"w": w}, 0.5, warmup=False, on_cpu=True)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 2.0, 1.0]))
    ema.update()
    assert ema.average["w"].tolist() == [2.0, 0.0, 2.0] and ema.updates == 1
    trained = torch.tensor([0.1, 0.2, 0.3])
    with torch.no_grad():
        w.copy_(trained)
    with ema.swapped_in():
        assert w.tolist() == [2.0, 0.0, 2.0]
    assert torch.equal(w.detach(), trained)
    again = LoraEMA({"w": w}, 0.5)
    again.load_state_dict(ema.state_dict(), "state.pt")
    assert torch.equal(again.average["w"], ema.average["w"]) and again.updates == 1
    with pytest.raises(UserError, match="state.pt holds an EMA of a different network"):
        again.load_state_dict({"average": {"v": torch.zeros(3)}, "updates": 1}, "state.pt")


def test_the_ema_covers_every_trained_adapter_weight_of_the_unet_and_the_text_encoder(tiny_components):
    from types import SimpleNamespace

    from lora_offset.training import networks
    from lora_offset.training.ema import make_ema

    unet, te = tiny_components["unet"], tiny_components["text_encoder"]
    unet_params = networks.add_lora(unet, networks.unet_lora_config(4, 4.0))
    te_params = networks.add_lora(te, networks.text_encoder_lora_config(4, 4.0))
    t = SimpleNamespace(ema_decay=0.9, ema_warmup=True, ema_on_cpu=True)
    ema = make_ema(t, {"unet": unet, "text_encoder": te})
    assert len(ema.params) == len(unet_params) + len(te_params) > 0
    assert {n.partition(".")[0] for n in ema.params} == {"unet", "text_encoder"}
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ema.average.values())
    assert make_ema(SimpleNamespace(ema_decay=0.0), {"unet": unet}) is None


def test_adapter_files_per_ema_save():
    class T:
        output_name, ema_save = "x", "ema"

    ema = object()
    assert adapter_files(T, None, "-step000002") == [("x-step000002.safetensors", False)]
    assert adapter_files(T, ema, "") == [("x.safetensors", True)]
    T.ema_save = "both"
    assert adapter_files(T, ema, "-000001") == [("x-000001.safetensors", False), ("x-000001-ema.safetensors", True)]


def record_weights(monkeypatch) -> dict:
    """Patch the loop's optimizer step to record the UNet LoRA weights before the first step and after each."""
    from lora_offset.training import train as train_module
    from lora_offset.training.train import lora_parameters

    seen = {"weights": [], "unet": None}
    real = train_module.optimizer_step

    def snapshot(parts):
        return {n: p.detach().double().clone() for n, p in lora_parameters(parts.unet).items()}

    def recording(parts, index):
        if not seen["weights"]:
            seen["weights"].append(snapshot(parts))
        loss = real(parts, index)
        seen["weights"].append(snapshot(parts))
        seen["unet"] = parts.unet
        return loss

    monkeypatch.setattr(train_module, "optimizer_step", recording)
    return seen


def kohya_tensors(unet, weights: dict) -> dict:
    """The kohya file's tensors for `unet` with its LoRA weights set to `weights`."""
    from lora_offset.formats.kohya import kohya_state_dict
    from lora_offset.training.train import lora_parameters

    with torch.no_grad():
        for n, p in lora_parameters(unet).items():
            p.copy_(weights[n].to(p.dtype))
    return {k: v.float() for k, v in kohya_state_dict(unet).items()}


@pytest.mark.parametrize("warmup, ema_save", [(True, "ema"), (False, "both")])
def test_the_exported_adapter_is_a_hand_computed_ema_of_the_per_step_weights(tmp_path, tiny_model_dir, images,
                                                                            monkeypatch, warmup, ema_save):
    decay = 0.6
    seen = record_weights(monkeypatch)
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "max_steps": 6, "learning_rate": 1e-2, "ema_decay": decay, "ema_warmup": warmup, "ema_save": ema_save,
        "save_every_steps": 4})
    assert main(["train", "--config", str(config)]) == 0
    weights = seen["weights"]
    assert len(weights) == 7  # before the first step, then after each of the 6
    average = {n: t.clone() for n, t in weights[0].items()}
    averages = []
    for k, after in enumerate(weights[1:]):
        d = min(decay, (1 + k) / (10 + k)) if warmup else decay
        average = {n: d * average[n] + (1 - d) * after[n] for n in average}
        averages.append(average)
    out = tmp_path / "out"
    at_step_4 = load_file(out / ("tiny-step000004.safetensors" if ema_save == "ema" else "tiny-step000004-ema.safetensors"))
    for key, value in kohya_tensors(seen["unet"], averages[3]).items():  # an intermediate save holds the EMA too
        torch.testing.assert_close(at_step_4[key], value, rtol=1e-6, atol=1e-7)
    expected = kohya_tensors(seen["unet"], average)
    trained = kohya_tensors(seen["unet"], weights[-1])
    ema_file = out / ("tiny.safetensors" if ema_save == "ema" else "tiny-ema.safetensors")
    exported = load_file(ema_file)
    assert exported.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(exported[key], expected[key], rtol=1e-6, atol=1e-7)
    ups = [k for k in expected if k.endswith("lora_up.weight")]
    assert max((expected[k] - trained[k]).abs().max().item() for k in ups) > 1e-3  # the EMA is not the last weights
    with safe_open(str(ema_file), "pt") as f:
        assert f.metadata()["lora_offset.weights"] == f'{{"weights": "ema", "ema_decay": {decay}, "ema_warmup": ' \
                                                       f'{str(warmup).lower()}}}'
    if ema_save == "both":  # the usual name holds the trained weights
        plain = load_file(out / "tiny.safetensors")
        for key in trained:
            torch.testing.assert_close(plain[key], trained[key], rtol=1e-6, atol=1e-7)
        with safe_open(str(out / "tiny.safetensors"), "pt") as f:
            assert f.metadata()["lora_offset.weights"] == '{"weights": "trained"}'


EMA_RUN = {"max_steps": 6, "save_every_steps": 2, "ema_decay": 0.7, "sample_every_steps": 2,
           "sample_prompts": ["sks dog"], "sample_steps": 1, "learning_rate": 1e-2}
EMA_MONITOR = {"prompts": ["sks dog"], "images": 1, "steps": 2, "resolution": 64}


@pytest.mark.slow
def test_sigkill_and_resume_with_the_ema_and_the_monitor_on_end_bit_identical(tmp_path, tiny_model_dir, images):
    """Killed inside step 3 (resumes from state 2) and inside the save of state 5 (resumes from 4): the
    adapters (each the EMA's) and the monitor's CSV are those of an uninterrupted run, bit for bit."""
    reference = tmp_path / "reference"
    config = write_config(reference, tiny_model_dir, images, monitor=EMA_MONITOR,
                          training={**EMA_RUN, "output_dir": str(reference / "out")})
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "killed" / "out"
    config = write_config(tmp_path / "killed", tiny_model_dir, images, monitor=EMA_MONITOR,
                          training={**EMA_RUN, "output_dir": str(out), "save_state_every_steps": 1})
    for i, point in enumerate(["step:3", "save:state-00000005.pt"]):
        proc = start_training(config, *(["--resume", "latest"] if i else []), driver=True, env={"PAUSE_AT": point})
        wait_for(lambda: f"PAUSED {point}" in output_of(proc), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    output = finish(start_training(config, "--resume", "latest"))
    assert "saved " in output, output
    assert temporaries(out) == []
    for name in ("tiny-step000002.safetensors", "tiny-step000004.safetensors", "tiny.safetensors"):
        assert_same_adapter(out / name, reference / "out" / name)
    assert (out / "monitor.csv").read_bytes() == (reference / "out" / "monitor.csv").read_bytes()
    assert torch.load(sorted((out / "state").glob("state-*.pt"))[-1], weights_only=True)["ema"]["updates"] == 5


def test_a_resume_with_other_ema_settings_is_one_error(tmp_path, tiny_model_dir, images):
    config = write_config(tmp_path, tiny_model_dir, images, training={"max_steps": 2, "save_state_every_steps": 1})
    assert main(["train", "--config", str(config)]) == 0
    with pytest.raises(UserError, match=r"state-00000001.pt was saved without an EMA of the weights and this config "
                                        r"has training.ema_decay: resume with the run's own training.ema_decay"):
        from lora_offset.config import load_config
        from lora_offset.training.train import train

        train(load_config(config, ["training.ema_decay=0.9", "training.max_steps=3"]),
              resume=str(tmp_path / "out" / "state" / "state-00000001.pt"))


def cfg(**training) -> Config:
    return Config.from_dict({"model": {"pretrained": "x"}, "training": training,
                             "dataset": {"subsets": [{"image_dir": "a"}]}})


@pytest.mark.parametrize("training, message", [
    ({"ema_decay": 1.0}, r"training.ema_decay must be in \[0, 1\) \(0 = off; 0.999 is usual\), got 1.0"),
    ({"ema_decay": -0.1}, r"training.ema_decay must be in \[0, 1\)"),
    ({"ema_on_cpu": True}, "training.ema_on_cpu is an EMA setting; it does nothing without training.ema_decay"),
    ({"ema_save": "both"}, "training.ema_save is an EMA setting"),
    ({"ema_warmup": False}, "training.ema_warmup is an EMA setting"),
    ({"sample_with_ema": False}, "training.sample_with_ema is an EMA setting"),
    ({"ema_save": "all", "ema_decay": 0.9}, r"training.ema_save must be one of 'ema' \| 'both', got 'all'"),
    ({"ema_decay": 0.9, "optimizer": "adamw_schedulefree"}, "schedule-free AdamW averages its weights already"),
])
def test_bad_ema_settings_are_one_error_naming_the_key(training, message):
    with pytest.raises(UserError, match=message):
        cfg(**training)
