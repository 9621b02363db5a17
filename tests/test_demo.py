"""lora-offset demo: the shipped base model, the per-condition configs, and `demo --quick` end to end."""

import json
import math

import numpy as np
import pytest
import torch

from lora_offset.experiments import demo, demo_base
from lora_offset.config import Config
from lora_offset.errors import UserError

ASSET = demo_base.ASSETS_DIR / demo_base.WEIGHTS_NAME


# ---------------------------------------------------------------------------------------------- base model


def test_shipped_weights_are_small_and_carry_their_recipe():
    assert ASSET.is_file(), "run scripts/train_demo_base.py to make the demo's base model"
    assert ASSET.stat().st_size <= 25 * 2**20
    record = demo_base.read_record(ASSET)
    assert record["settings"]["unet_steps"] >= 1000
    assert record["timings_s"]["total"] > 0
    assert 0 < record["scaling_factor"] < 100


def test_demo_unet_has_sd15_module_names_and_kohya_targets():
    from lora_offset.training import networks
    from lora_offset.sd15 import build_sd15

    unet = demo_base.build_components(seed=0)["unet"]
    sd15_names = {n for n, _ in build_sd15("unet", device="meta").named_modules()}
    assert {n for n, _ in unet.named_modules()} == sd15_names
    networks.add_lora(unet, networks.unet_lora_config(4, 4))
    assert len(networks.lora_module_names(unet)) == 192
    assert unet.config.sample_size * 8 == demo.RESOLUTION == demo_base.IMAGE_SIZE


def test_weights_round_trip_through_the_file_and_the_diffusers_folder(tmp_path):
    from lora_offset.config import ModelConfig
    from lora_offset.training.models import load_base_model

    components = demo_base.build_components(seed=3)
    components["vae"].register_to_config(scaling_factor=0.5)
    path = demo_base.save_weights(components, tmp_path / "w.safetensors", {"note": "test"})
    assert demo_base.read_record(path) == {"note": "test"}
    loaded = demo_base.load_components(path)
    for name in ("unet", "vae", "text_encoder"):
        a, b = components[name].state_dict(), loaded[name].state_dict()
        assert a.keys() == b.keys()
        for key in a:  # fp16 on disk
            torch.testing.assert_close(b[key], a[key].half().float(), rtol=0, atol=0)
    assert loaded["vae"].config.scaling_factor == 0.5
    folder = demo_base.expand_to_diffusers(tmp_path / "model", path)
    base = load_base_model(ModelConfig(pretrained=str(folder)))
    assert base.vae.config.scaling_factor == 0.5
    assert base.scheduler_config["beta_schedule"] == "scaled_linear"
    x = torch.randn(1, 4, 16, 16)
    cond = torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(base.unet(x, 10, cond).sample, loaded["unet"](x, 10, cond).sample)


def test_base_images_span_dark_to_bright():
    images = demo_base.base_images(64, seed=0, size=64)
    assert images.shape == (64, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    b = demo_base.mean_brightness(images)
    assert b.min() < 0.15 and b.max() > 0.85 and b.std() > 0.2


# ---------------------------------------------------------------------------------------------- protocol


def test_conditions_share_one_budget_and_differ_only_in_noise(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "c").mkdir()
    configs = {name: demo.train_config(name, tmp_path / "base", tmp_path / "i", tmp_path / "c", tmp_path / "out",
                                       demo.PROTOCOL) for name in demo.CONDITIONS}
    parsed = {name: Config.from_dict(cfg) for name, cfg in configs.items()}  # validates, as `train` would
    assert parsed["standard"].noise.offset == 0.0
    assert parsed["offset"].noise.offset == 0.1
    assert parsed["ztsnr"].noise.zero_terminal_snr and parsed["ztsnr"].model.prediction_type == "v_prediction"
    assert not parsed["standard"].noise.zero_terminal_snr and parsed["offset"].model.prediction_type == "epsilon"
    for name, cfg in parsed.items():
        assert cfg.training.max_steps == demo.PROTOCOL["max_steps"]
        assert (cfg.network.rank, cfg.network.alpha) == (demo.PROTOCOL["rank"], demo.PROTOCOL["alpha"])
        assert cfg.dataset.resolution == 128
        assert [s.is_reg for s in cfg.dataset.subsets] == [False, True]
        assert [s.class_tokens for s in cfg.dataset.subsets] == [demo.INSTANCE_PROMPT, demo.CLASS_PROMPT]
    strip = lambda c: {k: v for k, v in c.items() if k not in ("noise", "model", "training")}  # noqa: E731
    assert strip(configs["standard"]) == strip(configs["offset"]) == strip(configs["ztsnr"])
    train_parts = [{k: v for k, v in c["training"].items() if k not in ("output_dir", "output_name")}
                   for c in configs.values()]
    assert train_parts[0] == train_parts[1] == train_parts[2]


def test_image_luminance_reports_clamped_and_unclamped_means():
    black = -np.ones((1, 3, 8, 8))
    white = np.ones((1, 3, 8, 8))
    over = np.full((1, 3, 8, 8), 3.0)  # decodes to 2.0: clamped 1.0, unclamped 2.0
    clamped, unclamped = demo.image_luminance(np.concatenate([black, white, over]))
    np.testing.assert_allclose(clamped, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(unclamped, [0.0, 1.0, 2.0])


def test_training_data_brightness_is_wide():
    d = demo.data_brightness(n=64)
    assert d["n"] == 64
    assert d["std_luminance"] > 0.2 and d["min"] < 0.15 and d["max"] > 0.85


def test_base_noise_check_shifts_toward_black_and_white_latents():
    components = demo_base.build_components(seed=0)
    check = demo.base_noise_check(components, n=2, steps=2, seed=0, guidance=1.0)
    assert check["latent_pixels_per_channel"] == 256
    assert math.isclose(check["noise_mean_std"], 1 / 16)
    assert math.isclose(check["sqrt_alpha_bar_T"], 0.0683, abs_tol=1e-3)
    assert set(check["shifts"]) == {"none", "black", "white"}
    assert check["shifts"]["none"]["x_T_channel_shift"] == [0.0] * 4
    black, white = (np.array(check["shifts"][k]["x_T_channel_shift"]) for k in ("black", "white"))
    assert np.abs(black - white).max() > 0  # a random VAE still maps black and white apart
    for entry in check["shifts"].values():
        assert entry["n"] == 2 and 0 <= entry["mean_luminance"] <= 1


def test_demo_refuses_a_folder_with_other_files(tmp_path):
    import argparse

    (tmp_path / "notes.txt").write_text("mine")
    args = argparse.Namespace(out=str(tmp_path), quick=True, threads=1)
    with pytest.raises(UserError, match="holds other files"):
        demo.run(args)


def test_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="scripts/train_demo_base.py"):
        demo.run_demo(tmp_path / "out", quick=True, weights=tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    from safetensors import safe_open

    from lora_offset.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True
    assert set(report["conditions"]) == {"standard", "offset", "ztsnr"}
    for name, c in report["conditions"].items():
        for key in ("mean_luminance", "std_luminance"):
            assert 0 <= c[key] <= 1, (name, key)
        assert 0 <= c["class_prompt"]["mean_luminance"] <= 1
        assert (out / "eval" / c["grid"]).is_file()
        with safe_open(c["adapter"], framework="pt") as f:
            meta = f.metadata()
        assert meta["ss_noise_offset"] in (("0.1",) if name == "offset" else ("0.0", "0"))
    assert report["conditions"]["ztsnr"]["sampling"]["zero_terminal_snr"] is True
    assert report["conditions"]["standard"]["sampling"]["prediction_type"] == "epsilon"
    assert 0 <= report["base"]["mean_luminance"] <= 1
    assert report["base_training_data"]["std_luminance"] > 0.2
    assert set(report["base"]["noise_check"]["shifts"]) == {"none", "black", "white"}
    md = (out / "report.md").read_text()
    assert "--quick run" in md and "| standard noise |" in md and "NOT met" in md or "met" in md
    assert (out / "eval" / "luminance-histograms.png").is_file()
    assert "standard" in capsys.readouterr().out
