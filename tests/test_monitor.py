"""The range monitor: a tiny-model run with samples writes its CSV, TensorBoard scalars and plot; its
numbers are `eval`'s for the same adapter, prompts and seeds; its warnings fire once on constructed
colour flips and dark-probe rises and not on a normal run; its settings are checked."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lora_offset.cli import main
from lora_offset.config import Config
from lora_offset.errors import UserError
from lora_offset.training import monitor as M
from tests.test_train import make_images, write_config
from tests.test_train_kohya_datasets import scalars

PROBES = ["sks dog", "a very dark photo"]
MONITOR = {"prompts": PROBES, "images": 2, "steps": 3, "resolution": 64, "seed": 5}
TOLERANCE = 1e-7


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "5_sks dog", 4)


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, tiny_model_dir, images):
    """4 steps, samples (and so the monitor) every 2 steps; a learning rate that moves the probes visibly."""
    root = tmp_path_factory.mktemp("monitored")
    config = write_config(root, tiny_model_dir, images, monitor=MONITOR, training={
        "max_steps": 4, "learning_rate": 2e-2, "sample_every_steps": 2, "sample_prompts": ["sks dog"],
        "sample_steps": 1, "output_dir": str(root / "out")})
    logger = logging.getLogger("lora_offset")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert main(["train", "--config", str(config)]) == 0
    finally:
        logger.removeHandler(handler)
    return root / "out", [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_a_run_with_samples_writes_the_csv_the_tensorboard_scalars_and_the_plot(monitored_run):
    out, _ = monitored_run
    rows = M.read_csv(out / "monitor.csv")
    assert [(r["step"], r["weights"], r["prompt"]) for r in rows] == [
        (0, "base", "sks dog"), (0, "base", "a very dark photo"), (2, "trained", "sks dog"),
        (2, "trained", "a very dark photo"), (4, "trained", "sks dog"), (4, "trained", "a very dark photo")]
    for r in rows:
        assert 0 <= r["mean_luminance"] <= 1 and 0 <= r["std_luminance"] <= 0.5
        lum = 0.2126 * r["mean_r"] + 0.7152 * r["mean_g"] + 0.0722 * r["mean_b"]
        assert r["mean_luminance"] == pytest.approx(lum, abs=1e-9)  # luminance is linear: the mean's is the means'
    for prompt, tag in (("sks dog", "sks_dog"), ("a very dark photo", "a_very_dark_photo")):
        mine = {r["step"]: r for r in rows if r["prompt"] == prompt}
        for name, column in (("luminance", "mean_luminance"), ("luminance_spread", "std_luminance"), ("r", "mean_r"),
                             ("g", "mean_g"), ("b", "mean_b")):
            logged = scalars(out / "logs", f"monitor/{tag}/{name}")
            assert sorted(logged) == [0, 2, 4], name
            for step, value in logged.items():
                assert value == pytest.approx(mine[step][column], abs=1e-6)  # TensorBoard keeps float32
    with Image.open(out / "monitor.png") as plot:
        assert plot.format == "PNG" and plot.size[0] >= 800


def test_the_csv_holds_what_eval_measures_for_the_same_adapter_prompts_and_seeds(monitored_run, tiny_model_dir,
                                                                                 tmp_path):
    from lora_offset.experiments.evaluate import evaluate

    out, _ = monitored_run
    rows = M.read_csv(out / "monitor.csv")
    report = evaluate(str(tiny_model_dir), [str(out / "tiny.safetensors")], PROBES, n=MONITOR["images"],
                      steps=MONITOR["steps"], seed=MONITOR["seed"], resolution=MONITOR["resolution"],
                      guidance_scale=7.5, batch_size=MONITOR["images"], out=tmp_path / "eval")
    moved = []
    for r in rows:
        if r["step"] in (0, 4):  # the base model, and the exported adapter (saved in fp32 at the last step)
            s = report["settings"]["base" if r["step"] == 0 else "tiny"]["prompts"][r["prompt"]]
            got = [r["mean_luminance"], r["std_luminance"], r["mean_r"], r["mean_g"], r["mean_b"]]
            np.testing.assert_allclose(got, [s["mean_luminance"], s["std_luminance"], *s["mean_rgb"]], rtol=0,
                                       atol=TOLERANCE)
    for prompt in PROBES:
        base, last = [next(r for r in rows if r["step"] == k and r["prompt"] == prompt) for k in (0, 4)]
        moved.append(abs(last["mean_luminance"] - base["mean_luminance"]) + abs(last["mean_r"] - base["mean_r"]))
    assert min(moved) > 1000 * TOLERANCE  # the comparison tells the trained adapter from the base model


def test_no_warning_on_a_normal_run(monitored_run):
    _, warnings = monitored_run
    assert not [w for w in warnings if "range monitor" in w], warnings


# ----------------------------------------------------------------------------- warnings

def stats(lum: float, rgb) -> dict:
    return {"mean_luminance": lum, "std_luminance": 0.01, "mean_rgb": list(rgb)}


def test_range_warnings_by_hand():
    s = M.ProbeSettings(prompts=("blue shirt", "a very dark photo", "grey wall"))
    base = {"blue shirt": stats(0.3, (0.20, 0.25, 0.60)), "a very dark photo": stats(0.10, (0.1, 0.1, 0.1)),
            "grey wall": stats(0.5, (0.50, 0.51, 0.50))}
    # blue -> red: a flip. Blue still leading: none. Red overtaking by less than the margin: none.
    assert [k for k, _, _ in M.range_warnings(base, {"blue shirt": stats(0.3, (0.60, 0.25, 0.20))}, s)] == ["colour_flip"]
    assert M.range_warnings(base, {"blue shirt": stats(0.3, (0.50, 0.25, 0.55))}, s) == []
    assert M.range_warnings(base, {"blue shirt": stats(0.3, (0.52, 0.25, 0.50))}, s) == []
    # A near-grey probe has no colour to flip: its top channel changing is not a warning.
    assert M.range_warnings(base, {"grey wall": stats(0.5, (0.53, 0.50, 0.50))}, s) == []
    # The dark probe: rising past dark_rise warns, by less (or falling) does not; other probes may brighten.
    assert [k for k, _, _ in M.range_warnings(base, {"a very dark photo": stats(0.16, (0.16,) * 3)}, s)] == ["dark_rise"]
    assert M.range_warnings(base, {"a very dark photo": stats(0.14, (0.14,) * 3)}, s) == []
    assert M.range_warnings(base, {"a very dark photo": stats(0.02, (0.02,) * 3)}, s) == []
    assert M.range_warnings(base, {"grey wall": stats(0.9, (0.9, 0.91, 0.9))}, s) == []
    (_, _, message), = M.range_warnings(base, {"blue shirt": stats(0.3, (0.60, 0.25, 0.20))}, s)
    assert message == ("colour flip on 'blue shirt': its dominant channel was B in the base model (R 0.200 G 0.250 "
                       "B 0.600), now R leads it by 0.400 (R 0.600 G 0.250 B 0.200; monitor.flip_margin = 0.03)")


@pytest.fixture()
def tiny_pipe(tiny_components):
    from lora_offset.experiments.sample import build_pipeline

    c = tiny_components
    return build_pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], dict(c["scheduler"].config))


def test_the_colour_flip_and_dark_warnings_fire_once_on_a_constructed_case(tiny_pipe, tmp_path, caplog):
    """Real measurements: the tiny model's images lean red (R leads G by ~0.07); swapping the VAE decoder's
    red and blue output channels makes them lean blue, a colour flip; raising its output bias brightens
    the dark probe. Each warning comes once, however many steps show it."""
    settings = M.ProbeSettings(prompts=("a photo", "a very dark photo"), images=2, steps=2, width=64, height=64)
    monitor = M.RangeMonitor(tmp_path / "monitor.csv", settings)
    base = M.measure(tiny_pipe, settings)
    top, lead = M._lead(base["a photo"]["mean_rgb"])
    assert (top, lead > settings.flip_margin) == (0, True)  # red, by more than the margin
    assert monitor.record(0, "base", base) == []
    assert monitor.record(1, "trained", M.measure(tiny_pipe, settings)) == []  # the same weights: nothing
    conv_out = tiny_pipe.vae.decoder.conv_out
    with torch.no_grad():
        conv_out.weight[[0, 2]] = conv_out.weight[[2, 0]].clone()
        conv_out.bias[[0, 2]] = conv_out.bias[[2, 0]].clone()
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        flipped = monitor.record(2, "trained", M.measure(tiny_pipe, settings))
    assert len(flipped) == 2 and all("range monitor, step 2: colour flip on " in m for m in flipped)
    assert "its dominant channel was R in the base model" in flipped[0] and "now B leads it by" in flipped[0]
    assert [r.getMessage() for r in caplog.records] == flipped  # logged as warnings, as returned
    with torch.no_grad():
        conv_out.bias += 0.4  # +0.2 on every channel in [0, 1]
    again = monitor.record(3, "trained", M.measure(tiny_pipe, settings))
    assert len(again) == 1 and "range monitor, step 3: 'a very dark photo' is brighter than in the base model" in again[0]
    assert monitor.record(4, "trained", M.measure(tiny_pipe, settings)) == []  # once only
    # A resumed run (the rows up to step 4 kept) has warned already: no repeat.
    resumed = M.RangeMonitor(tmp_path / "monitor.csv", settings, resume_step=4)
    assert resumed.record(5, "trained", M.measure(tiny_pipe, settings)) == []
    # Resumed from step 1, the rows after it are dropped and the warnings can come again.
    earlier = M.RangeMonitor(tmp_path / "monitor.csv", settings, resume_step=1)
    assert sorted({r["step"] for r in earlier.rows}) == [0, 1]
    assert len(earlier.record(2, "trained", M.measure(tiny_pipe, settings))) == 3


def test_adapters_off_is_the_base_model_and_restores_the_adapter(tiny_pipe):
    from lora_offset.training import networks

    settings = M.ProbeSettings(prompts=("a photo",), images=1, steps=2, width=64, height=64)
    before = M.measure(tiny_pipe, settings)
    params = networks.add_lora(tiny_pipe.unet, networks.unet_lora_config(4, 4.0))
    with torch.no_grad():
        for p in params:
            p.add_(0.3)  # a LoRA that changes the images
    changed = M.measure(tiny_pipe, settings)
    assert changed["a photo"]["mean_luminance"] != before["a photo"]["mean_luminance"]
    with M.adapters_off(tiny_pipe.unet, tiny_pipe.text_encoder):
        assert M.measure(tiny_pipe, settings) == before
    assert M.measure(tiny_pipe, settings) == changed
    assert all(p.requires_grad for p in params)


# ----------------------------------------------------------------------------- settings

def config(**monitor_and_training) -> Config:
    training = monitor_and_training.pop("training", {})
    return Config.from_dict({"model": {"pretrained": "x"}, "monitor": monitor_and_training, "training": training,
                             "dataset": {"resolution": 128, "subsets": [{"image_dir": "a", "class_tokens": "sks dog"},
                                                                        {"image_dir": "b", "class_tokens": "dog",
                                                                         "is_reg": True}]}})


def test_defaults_probe_the_instance_and_class_prompts_and_follow_the_samples():
    on = config(training={"sample_every_steps": 10, "sample_prompts": ["x"], "sample_sampler": "euler",
                          "sample_guidance_scale": 4.0})
    assert M.active(on) and not M.active(config())
    assert not M.active(config(enabled=False, training={"sample_every_steps": 10, "sample_prompts": ["x"]}))
    s = M.ProbeSettings.from_config(on)
    assert s.prompts == ("sks dog", "dog", "a very dark photo", "a very bright photo")
    assert (s.images, s.steps, s.seed, s.width, s.height, s.sampler, s.guidance_scale) == (2, 10, 0, 128, 128, "euler", 4.0)
    assert (s.flip_margin, s.dark_prompt, s.dark_rise) == (0.03, "a very dark photo", 0.05)
    mine = M.ProbeSettings.from_config(config(prompts=["a red car"], resolution=64, guidance_scale=3.0, seed=9,
                                              training={"sample_at_first": True, "sample_prompts": ["x"]}))
    assert (mine.prompts, mine.width, mine.guidance_scale, mine.seeds) == (("a red car",), 64, 3.0, [9, 10])


@pytest.mark.parametrize("monitor, message", [
    ({"enabled": True}, "monitor.enabled = true, but no samples are scheduled"),
    ({"images": 0}, "monitor.images must be >= 1, got 0"),
    ({"steps": 0}, "monitor.steps must be >= 1, got 0"),
    ({"resolution": 100}, "monitor.resolution must be a positive multiple of 64, got 100"),
    ({"guidance_scale": -1.0}, "monitor.guidance_scale must be >= 0, got -1.0"),
    ({"flip_margin": 0.0}, r"monitor.flip_margin must be in \(0, 1\]"),
    ({"dark_rise": 2.0}, r"monitor.dark_rise must be in \(0, 1\]"),
    ({"prompts": ["ok", " "]}, r"monitor.prompts\[1\] is empty"),
    ({"imags": 3}, "unknown key 'monitor.imags'; did you mean 'monitor.images'"),
])
def test_bad_monitor_settings_are_one_error_naming_the_key(monitor, message):
    with pytest.raises(UserError, match=message):
        config(**monitor)
