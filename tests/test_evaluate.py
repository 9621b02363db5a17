"""eval: brightness metrics (pure), LoRA loading and per-LoRA sampling settings, report files."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from lora_offset.cli import main
from lora_offset.errors import UserError
from lora_offset.experiments.brightness_report import (brightness_stats, image_grid, luminance, luminance_histogram,
                                                       render_markdown)
from lora_offset.experiments.evaluate import (LoraSpec, SamplingSettings, evaluate, parse_lora_spec, sampling_from_metadata,
                                  sampling_from_scheduler)

FAST = dict(n=2, steps=2, seed=0, resolution=64, guidance_scale=7.5)
STAT_KEYS = ("mean_luminance", "std_luminance", "mean_luminance_unclamped", "p1", "p99",
             "frac_below_0_05", "frac_above_0_95")


# ----------------------------------------------------------------------------- pure metrics

@pytest.mark.parametrize("rgb, expected", [
    ((1, 0, 0), 0.2126), ((0, 1, 0), 0.7152), ((0, 0, 1), 0.0722), ((1, 1, 1), 1.0), ((0, 0, 0), 0.0),
    ((0.5, 0.5, 0.5), 0.5), ((0.2, 0.4, 0.6), 0.2126 * 0.2 + 0.7152 * 0.4 + 0.0722 * 0.6),
])
def test_luminance_rec709_weights(rgb, expected):
    assert luminance(np.array(rgb, dtype=float)) == pytest.approx(expected, abs=1e-12)


def test_luminance_keeps_leading_shape_and_rejects_channel_first():
    x = np.random.default_rng(0).random((2, 5, 7, 3))
    assert luminance(x).shape == (2, 5, 7)
    with pytest.raises(ValueError, match="channel-last"):
        luminance(np.zeros((2, 3, 5, 7)))


def test_all_black_images():
    s = brightness_stats(np.zeros((3, 4, 4, 3)), unclamped=np.zeros((3, 4, 4, 3)))
    assert s["mean_luminance"] == 0 and s["std_luminance"] == 0 and s["mean_luminance_unclamped"] == 0
    assert s["p1"] == 0 and s["p99"] == 0
    assert s["frac_below_0_05"] == 1 and s["frac_above_0_95"] == 0
    assert s["per_image_mean"] == [0, 0, 0]


def test_all_white_images():
    s = brightness_stats(np.ones((2, 3, 3, 3)))
    assert s["mean_luminance"] == pytest.approx(1) and s["frac_above_0_95"] == 1 and s["frac_below_0_05"] == 0
    assert s["mean_luminance_unclamped"] is None


def test_percentiles_and_fractions_on_a_gray_ramp():
    # One image of 101 gray pixels 0.00, 0.01, ..., 1.00: p1 = 0.01 and p99 = 0.99 exactly
    # (linear interpolation between order statistics); 0.00-0.04 are < 0.05, 0.96-1.00 are > 0.95.
    ramp = np.repeat((np.arange(101) / 100)[None, None, :, None], 3, axis=3)
    s = brightness_stats(ramp)
    assert s["p1"] == pytest.approx(0.01) and s["p99"] == pytest.approx(0.99)
    assert s["frac_below_0_05"] == pytest.approx(5 / 101)
    assert s["frac_above_0_95"] == pytest.approx(5 / 101)
    assert s["mean_luminance"] == pytest.approx(0.5)


def test_mean_and_spread_are_over_per_image_means():
    images = np.stack([np.full((2, 2, 3), 0.2), np.full((2, 2, 3), 0.6), np.full((2, 2, 3), 0.4)])
    s = brightness_stats(images)
    assert s["per_image_mean"] == pytest.approx([0.2, 0.6, 0.4])
    assert s["mean_luminance"] == pytest.approx(0.4)
    assert s["std_luminance"] == pytest.approx(math.sqrt((0.04 + 0.04 + 0) / 3))


def test_mean_rgb_is_the_mean_over_images_of_each_channel():
    images = np.zeros((2, 2, 2, 3))
    images[0, ..., 2] = 1.0  # a blue image
    images[1, 0, :, 0] = 1.0  # half of the second image red
    s = brightness_stats(images)
    assert s["mean_rgb"] == pytest.approx([0.25, 0.0, 0.5])
    assert s["mean_luminance"] == pytest.approx(float(np.dot(s["mean_rgb"], [0.2126, 0.7152, 0.0722])))


def test_half_dark_half_bright():
    img = np.zeros((1, 2, 2, 3))
    img[0, 0] = 1.0  # one row white
    s = brightness_stats(img)
    assert s["frac_below_0_05"] == 0.5 and s["frac_above_0_95"] == 0.5 and s["mean_luminance"] == pytest.approx(0.5)


def test_unclamped_mean_reveals_clamped_noise():
    rng = np.random.default_rng(0)
    raw = rng.normal(0.0, 2.0, size=(4, 16, 16, 3))  # noise around black, in [0, 1] units
    s = brightness_stats(np.clip(raw, 0, 1), unclamped=raw)
    assert s["mean_luminance"] > 0.3  # clamping fakes a gray-ish image
    assert abs(s["mean_luminance_unclamped"]) < 0.1


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_stats_properties(n, h, w, seed):
    images = np.random.default_rng(seed).random((n, h, w, 3))
    s = brightness_stats(images, unclamped=images)
    # Luminance is linear: the mean luminance is the luminance of the channel means.
    channel_means = images.reshape(-1, 3).mean(axis=0)
    assert s["mean_luminance"] == pytest.approx(float(channel_means @ [0.2126, 0.7152, 0.0722]), abs=1e-12)
    assert s["mean_luminance_unclamped"] == pytest.approx(s["mean_luminance"], abs=1e-12)
    assert 0 <= s["p1"] <= s["p99"] <= 1
    assert 0 <= s["frac_below_0_05"] <= 1 and 0 <= s["frac_above_0_95"] <= 1
    assert s["frac_below_0_05"] + s["frac_above_0_95"] <= 1
    assert 0 <= s["std_luminance"] <= 0.5 and len(s["per_image_mean"]) == n


def test_histogram_sums_to_one_and_bins_right():
    ramp = np.repeat((np.arange(100) / 100 + 0.005)[None, None, :, None], 3, axis=3)
    h = luminance_histogram(ramp, bins=10)
    assert len(h) == 10 and sum(h) == pytest.approx(1)
    assert h == pytest.approx([0.1] * 10)
    assert luminance_histogram(np.zeros((1, 2, 2, 3)), bins=4) == [1.0, 0.0, 0.0, 0.0]


def test_stats_reject_bad_shapes():
    with pytest.raises(ValueError):
        brightness_stats(np.zeros((0, 2, 2, 3)))
    with pytest.raises(ValueError):
        brightness_stats(np.zeros((2, 2, 3)))


def test_image_grid_layout():
    ims = [Image.new("RGB", (4, 3), (i * 40, 0, 0)) for i in range(5)]
    g = image_grid(ims)
    assert g.size == (12, 6)  # 3 columns x 2 rows
    a = np.asarray(g)
    assert a[0, 4, 0] == 40 and a[3, 0, 0] == 120 and a[3, 4, 0] == 160 and a[3, 8, 0] == 0


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("text, path, weight", [
    ("a.safetensors", "a.safetensors", 1.0), ("a.safetensors:0.5", "a.safetensors", 0.5),
    ("dir/a b.safetensors:-1", "dir/a b.safetensors", -1.0), (r"C:\loras\a.safetensors", r"C:\loras\a.safetensors", 1.0),
    (r"C:\loras\a.safetensors:0.8", r"C:\loras\a.safetensors", 0.8),
])
def test_parse_lora_spec(text, path, weight):
    spec = parse_lora_spec(text)
    assert str(spec.path) == path and spec.weight == weight


@pytest.mark.parametrize("metadata, expected", [
    (None, SamplingSettings("epsilon", False)),
    ({"ss_base_model_version": "sd_v1", "ss_zero_terminal_snr": "False"}, SamplingSettings("epsilon", False)),
    ({"ss_base_model_version": "sd_v1_v"}, SamplingSettings("v_prediction", False)),
    ({"ss_v_parameterization": "True"}, SamplingSettings("v_prediction", False)),
    ({"modelspec.prediction_type": "v"}, SamplingSettings("v_prediction", False)),
    # our trainer's files: ZTSNR + v-prediction
    ({"ss_zero_terminal_snr": "True", "ss_base_model_version": "sd_v1_v", "ss_v_parameterization": "True",
      "modelspec.prediction_type": "v"}, SamplingSettings("v_prediction", True)),
    # ZTSNR and no word on prediction: v (epsilon cannot be sampled at alpha_bar_T = 0)
    ({"ss_zero_terminal_snr": "True"}, SamplingSettings("v_prediction", True)),
    # kohya epsilon + ZTSNR training: sampled on the standard schedule, as kohya does
    ({"ss_zero_terminal_snr": "True", "ss_v_parameterization": "False"}, SamplingSettings("epsilon", False)),
])
def test_sampling_from_metadata(metadata, expected):
    assert sampling_from_metadata(metadata) == expected


def test_sampling_from_scheduler():
    assert sampling_from_scheduler({"prediction_type": "epsilon"}) == SamplingSettings("epsilon", False)
    assert sampling_from_scheduler({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}) == \
        SamplingSettings("v_prediction", True)


# ----------------------------------------------------------------------------- LoRA files

def _lora_unet(model_dir, seed, rank=4, scale=0.3):
    from diffusers import UNet2DConditionModel

    from lora_offset.training.networks import add_lora, unet_lora_config

    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    torch.manual_seed(seed)  # lora_A's init draws from the global RNG: same seed, same file, every run
    add_lora(unet, unet_lora_config(rank, rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # PEFT starts lora_B at zero: make the LoRA do something
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return unet


def _kohya_tensors(unet):
    try:
        from lora_offset.formats.kohya import kohya_state_dict
    except ImportError:  # the export helper's module is not there: write the keys by hand
        from lora_offset.formats.keys import UNET_PREFIX, kohya_name
        from lora_offset.training.networks import lora_module_names

        state = {}
        modules = dict(unet.named_modules())
        for name in lora_module_names(unet):
            m = modules[name]
            key = kohya_name(UNET_PREFIX, name)
            state[f"{key}.lora_down.weight"] = m.lora_A["default"].weight.detach().clone()
            state[f"{key}.lora_up.weight"] = m.lora_B["default"].weight.detach().clone()
            state[f"{key}.alpha"] = torch.tensor(float(m.scaling["default"] * m.r["default"]))
        return state
    return kohya_state_dict(unet)


def write_lora(path, model_dir, seed, metadata=None):
    save_file(_kohya_tensors(_lora_unet(model_dir, seed)), str(path), metadata=metadata or {"ss_base_model_version": "sd_v1"})
    return path


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "a": write_lora(d / "a.safetensors", tiny_model_dir, 1),
        "b": write_lora(d / "b.safetensors", tiny_model_dir, 2),
        "ztsnr": write_lora(d / "z.safetensors", tiny_model_dir, 1, {
            "ss_base_model_version": "sd_v1_v", "ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}),
    }


def _numbers(stats):
    return all(isinstance(stats[k], float) and math.isfinite(stats[k]) for k in STAT_KEYS)


def test_eval_base_and_lora_report_files(tiny_model_dir, lora_files, tmp_path):
    out = tmp_path / "eval"
    report = evaluate(str(tiny_model_dir), [LoraSpec(lora_files["a"], 1.0)], ["a photo", "sks thing"], out=out, **FAST)
    assert list(report["settings"]) == ["base", "a"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    for name, entry in report["settings"].items():
        assert list(entry["prompts"]) == ["a photo", "sks thing"]
        for prompt, s in entry["prompts"].items():
            assert _numbers(s), s
            assert 0 <= s["p1"] <= s["mean_luminance"] <= s["p99"] <= 1
            assert len(s["per_image_mean"]) == 2
            assert s["mean_luminance"] == pytest.approx(np.mean(s["per_image_mean"]))
            with Image.open(out / s["grid"]) as g:
                assert g.size == (128, 64)  # 2 images of 64x64, side by side
    assert report["settings"]["base"]["lora"] is None
    assert report["settings"]["a"]["lora"] == str(lora_files["a"]) and report["settings"]["a"]["weight"] == 1.0
    with Image.open(out / report["plot"]) as plot:
        assert plot.format == "PNG" and plot.size[0] > 200
    md = (out / "report.md").read_text()
    assert "| base | a photo |" in md and "| a (×1) | sks thing |" in md
    assert f"]({report['plot']})" in md and f"]({report['settings']['a']['prompts']['a photo']['grid']})" in md
    assert {"torch", "diffusers", "peft", "transformers", "lora_offset"} <= set(report["versions"])
    assert report["config"]["n"] == 2 and report["config"]["prompts"] == ["a photo", "sks thing"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # The LoRA changes the images (same seeds): the per-image means differ.
    base_means = report["settings"]["base"]["prompts"]["a photo"]["per_image_mean"]
    lora_means = report["settings"]["a"]["prompts"]["a photo"]["per_image_mean"]
    assert max(abs(x - y) for x, y in zip(base_means, lora_means)) > 1e-3


def test_lora_weight_zero_is_the_base_and_settings_do_not_leak(tiny_model_dir, lora_files, tmp_path, tiny_components):
    specs = [LoraSpec(lora_files["a"], 0.0), LoraSpec(lora_files["b"], 1.0), LoraSpec(lora_files["a"], 1.0)]
    report = evaluate(str(tiny_model_dir), specs, ["x"], out=tmp_path / "e1", **FAST)
    names = list(report["settings"])
    assert names == ["base", "a@0", "b", "a"]
    mean = {k: report["settings"][k]["prompts"]["x"]["per_image_mean"] for k in names}
    assert mean["a@0"] == pytest.approx(mean["base"], abs=1e-6)
    # b then a gives the same images for a as a alone: the earlier LoRA was unloaded.
    alone = evaluate(str(tiny_model_dir), [LoraSpec(lora_files["a"], 1.0)], ["x"], out=tmp_path / "e2", **FAST)
    assert mean["a"] == pytest.approx(alone["settings"]["a"]["prompts"]["x"]["per_image_mean"], abs=1e-6)
    assert mean["b"] != pytest.approx(mean["a"], abs=1e-4)


def test_text_encoder_lora_is_loaded(tiny_model_dir, tmp_path):
    """A LoRA on the text encoder alone (kohya lora_te_text_model_* keys) changes the images."""
    from transformers import CLIPTextModel

    from lora_offset.training.networks import add_lora, text_encoder_lora_config

    export = pytest.importorskip("lora_offset.formats.kohya")
    te = CLIPTextModel.from_pretrained(str(tiny_model_dir / "text_encoder"))
    add_lora(te, text_encoder_lora_config(4, 4))
    with torch.no_grad():
        for name, p in te.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    state = export.kohya_state_dict(None, te)
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in state)
    path = tmp_path / "te.safetensors"
    save_file(state, str(path))
    report = evaluate(str(tiny_model_dir), [LoraSpec(path)], ["x"], out=tmp_path / "e", **FAST)
    base = report["settings"]["base"]["prompts"]["x"]["per_image_mean"]
    lora = report["settings"]["te"]["prompts"]["x"]["per_image_mean"]
    assert max(abs(a - b) for a, b in zip(base, lora)) > 1e-4


def test_components_are_left_without_lora_layers(tiny_model_dir, lora_files, tmp_path):
    from lora_offset.experiments.evaluate import _load_base
    from lora_offset.training.networks import lora_module_names

    components = _load_base(str(tiny_model_dir), allow_pickle=False)
    evaluate(str(tiny_model_dir), [LoraSpec(lora_files["a"])], ["x"], out=tmp_path / "e", components=components, **FAST)
    assert lora_module_names(components["unet"]) == [] and lora_module_names(components["text_encoder"]) == []


@pytest.mark.parametrize("level, unclamped", [(-1.0, 0.0), (-3.0, -1.0)])
def test_black_decode_end_to_end(tiny_model_dir, tmp_path, level, unclamped):
    """Replace the VAE decode by a constant: the report must say exactly black."""
    from lora_offset.experiments.evaluate import _load_base

    components = _load_base(str(tiny_model_dir), allow_pickle=False)
    vae = components["vae"]

    def black_decode(z, return_dict=True, **kwargs):
        return (torch.full((z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8), level),)

    vae.decode = black_decode
    report = evaluate(str(tiny_model_dir), [], ["x"], out=tmp_path / "e", components=components, **FAST)
    s = report["settings"]["base"]["prompts"]["x"]
    assert s["mean_luminance"] == 0 and s["frac_below_0_05"] == 1 and s["frac_above_0_95"] == 0
    assert s["p1"] == 0 and s["p99"] == 0 and s["std_luminance"] == 0
    assert s["mean_luminance_unclamped"] == pytest.approx(unclamped)
    with Image.open(tmp_path / "e" / s["grid"]) as g:
        assert np.asarray(g).max() == 0


def test_metadata_switches_to_ztsnr_sampling(tiny_model_dir, lora_files, tmp_path, monkeypatch):
    """A ZTSNR/v LoRA is sampled with rescaled betas, trailing steps, v-prediction and rescale 0.7."""
    from diffusers import StableDiffusionPipeline

    seen = []
    original = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        cfg = self.scheduler.config
        seen.append((cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing,
                     float(self.scheduler.alphas_cumprod[-1]), kwargs["guidance_rescale"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    report = evaluate(str(tiny_model_dir), [LoraSpec(lora_files["a"]), LoraSpec(lora_files["ztsnr"])], ["x"],
                      out=tmp_path / "e", **FAST)
    base, plain, ztsnr = seen
    assert base[:3] == ("epsilon", False, "leading") and base[3] > 1e-3 and base[4] == 0.0
    assert plain[:3] == ("epsilon", False, "leading") and plain[4] == 0.0
    assert ztsnr[:3] == ("v_prediction", True, "trailing") and ztsnr[3] == 0.0 and ztsnr[4] == 0.7
    assert report["settings"]["z"]["sampling"] == {"prediction_type": "v_prediction", "zero_terminal_snr": True,
                                                  "timestep_spacing": "trailing", "guidance_rescale": 0.7}
    assert _numbers(report["settings"]["z"]["prompts"]["x"])
    assert "v_prediction, zero terminal SNR True, trailing" in (tmp_path / "e" / "report.md").read_text()


def test_sampler_and_max_token_length_reach_the_pipeline(tiny_model_dir, lora_files, tmp_path, monkeypatch):
    """--sampler picks kohya's sampler for every setting; --max-token-length 150 encodes 150 prompt tokens (kohya's chunks, lora_offset.training.text)."""
    from diffusers import StableDiffusionPipeline

    seen = []
    original = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        embeds = kwargs.get("prompt_embeds")
        seen.append((type(self.scheduler).__name__, self.scheduler.config.timestep_spacing,
                     None if embeds is None else embeds.shape[1]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    report = evaluate(str(tiny_model_dir), [LoraSpec(lora_files["a"]), LoraSpec(lora_files["ztsnr"])], ["x"],
                      out=tmp_path / "e", sampler="euler_a", max_token_length=150, **FAST)
    assert seen == [("EulerAncestralDiscreteScheduler", "leading", 152), ("EulerAncestralDiscreteScheduler", "leading", 152),
                    ("EulerAncestralDiscreteScheduler", "trailing", 152)]  # ZTSNR keeps its schedule; 150 tokens + BOS + EOS
    assert (report["config"]["sampler"], report["config"]["max_token_length"]) == ("euler_a", 150)
    assert "2 euler_a steps" in (tmp_path / "e" / "report.md").read_text()
    seen.clear()
    evaluate(str(tiny_model_dir), [], ["x"], out=tmp_path / "d", **FAST)
    assert seen == [("DDIMScheduler", "leading", None)]  # the defaults: DDIM, the pipeline's own 75-token encoding


def test_bad_sampler_or_token_length_is_one_clear_error(tiny_model_dir, lora_files, tmp_path):
    with pytest.raises(UserError, match=r"--sampler 'eulr_a' is not one of ddim, .*; did you mean 'euler_a'\?"):
        evaluate("/nowhere", [], ["x"], out=tmp_path / "e", sampler="eulr_a", **FAST)
    with pytest.raises(UserError, match="--max-token-length must be one of 75, 150, 225, got 100"):
        evaluate("/nowhere", [], ["x"], out=tmp_path / "e", max_token_length=100, **FAST)
    with pytest.raises(UserError, match=r"z.safetensors: was trained with zero terminal SNR, which --sampler heun "
                                        r"cannot sample; use one of ddim, euler, "):
        evaluate("/nowhere", [LoraSpec(lora_files["ztsnr"])], ["x"], out=tmp_path / "e", sampler="heun", **FAST)
    assert not (tmp_path / "e").exists()  # refused before anything is loaded or written


# ----------------------------------------------------------------------------- errors and CLI

def test_missing_lora_file_is_a_user_error_before_loading(tmp_path):
    with pytest.raises(UserError, match="LoRA file not found: .*nope.safetensors"):
        evaluate("/does/not/exist", [LoraSpec(tmp_path / "nope.safetensors")], ["x"], out=tmp_path / "e", **FAST)


def test_lora_with_foreign_keys_is_a_user_error(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_no_such_module.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_module.lora_up.weight": torch.zeros(4, 2),
               "something_else.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(UserError, match="bad.safetensors"):
        evaluate(str(tiny_model_dir), [LoraSpec(bad)], ["x"], out=tmp_path / "e", **FAST)


def test_loha_file_is_a_user_error_that_says_what_to_do(tmp_path):
    """diffusers cannot load LyCORIS keys: one error naming the file and the way out, no traceback."""
    loha = tmp_path / "loha.safetensors"
    save_file({f"lora_unet_x.{k}": torch.zeros(2, 2) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
              str(loha))
    with pytest.raises(UserError, match=r"loha.safetensors: is a LoHa/LoKr file .*lora-offset merge --base"):
        evaluate("/does/not/exist", [LoraSpec(loha)], ["x"], out=tmp_path / "e", **FAST)


def test_not_safetensors_is_a_user_error(tmp_path):
    f = tmp_path / "x.ckpt"
    f.write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match=r"x.ckpt: eval reads LoRA files in .safetensors format only"):
        evaluate("/does/not/exist", [str(f)], ["x"], out=tmp_path / "e", **FAST)
    g = tmp_path / "y.safetensors"
    g.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="y.safetensors: not a readable safetensors file"):
        evaluate("/does/not/exist", [str(g)], ["x"], out=tmp_path / "e", **FAST)


@pytest.mark.parametrize("kwargs, match", [(dict(n=0), "--n"), (dict(resolution=60), "--resolution")])
def test_bad_numbers(tmp_path, kwargs, match):
    args = {**FAST, **kwargs}
    with pytest.raises(UserError, match=match):
        evaluate("/nowhere", [], ["x"], out=tmp_path / "e", **args)


def test_cli_eval(tiny_model_dir, lora_files, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["eval", "--base", str(tiny_model_dir), "--lora", f"{lora_files['b']}:0.5", "--prompt", "a photo",
               "--n", "2", "--steps", "2", "--resolution", "64", "--seed", "3", "--out", str(out),
               "--sampler", "dpm++_2m_karras", "--max-token-length", "225"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["settings"]) == ["base", "b@0.5"] and report["settings"]["b@0.5"]["weight"] == 0.5
    assert report["config"]["seed"] == 3
    assert (report["config"]["sampler"], report["config"]["max_token_length"]) == ("dpm++_2m_karras", 225)
    captured = capsys.readouterr()
    assert "report:" in captured.out
    assert "[b@0.5] 2 images of 'a photo' (epsilon)" in captured.err


def test_cli_eval_missing_base_exits_2(tmp_path, capsys):
    rc = main(["eval", "--base", str(tmp_path / "nomodel"), "--prompt", "x", "--n", "1", "--steps", "1",
               "--resolution", "64", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nomodel" in err


def test_render_markdown_escapes_pipes():
    report = {"config": {"base": "m", "n": 1, "seed": 0, "steps": 1, "guidance_scale": 1.0, "resolution": 8},
              "settings": {"base": {"lora": None, "weight": None, "sampling": {
                  "prediction_type": "epsilon", "zero_terminal_snr": False, "timestep_spacing": "leading",
                  "guidance_rescale": 0.0},
                  "prompts": {"a|b": {**{k: 0.5 for k in STAT_KEYS}, "grid": "g.png"}}}}, "plot": "p.png"}
    md = render_markdown(report)
    assert "| base | a/b | 0.500 ± 0.500 |" in md
