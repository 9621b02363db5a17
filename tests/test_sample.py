"""sample: DDIM pipeline around live (LoRA'd) models, per-seed determinism, ZTSNR sampling, saving."""

import numpy as np
import pytest
import torch
from PIL import Image

from lora_offset.experiments.sample import (SAMPLERS, build_pipeline, eval_mode, generate, generate_decoded,
                                            sample_filename, sampler_supports_zero_terminal_snr, sampling_scheduler,
                                            sampling_scheduler_config, save_samples, to_pil, to_unit_range)
from lora_offset.tiny import SD15_SCHEDULER_CONFIG

FAST = dict(steps=2, height=64, width=64)


def _pipe(components, **kwargs):
    c = components
    return build_pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], dict(c["scheduler"].config), **kwargs)


def test_sampling_scheduler_config_is_pure():
    cfg = dict(SD15_SCHEDULER_CONFIG)
    z = sampling_scheduler_config(cfg, prediction_type="v_prediction", zero_terminal_snr=True)
    assert z["rescale_betas_zero_snr"] is True and z["timestep_spacing"] == "trailing"
    assert z["prediction_type"] == "v_prediction" and z["beta_schedule"] == "scaled_linear"
    assert cfg == SD15_SCHEDULER_CONFIG  # input untouched
    e = sampling_scheduler_config({**cfg, "_class_name": "PNDMScheduler"})
    assert "_class_name" not in e and "rescale_betas_zero_snr" not in e and e["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        sampling_scheduler_config(cfg, prediction_type="sample")


def test_build_pipeline_schedulers(tiny_components):
    from diffusers import DDIMScheduler

    plain = _pipe(tiny_components)
    assert isinstance(plain.scheduler, DDIMScheduler) and plain.safety_checker is None
    plain.scheduler.set_timesteps(4)
    assert plain.scheduler.timesteps.tolist() == [751, 501, 251, 1]  # SD's leading spacing, steps_offset 1
    assert float(plain.scheduler.alphas_cumprod[-1]) == pytest.approx(0.0047, abs=2e-4)

    z = _pipe(tiny_components, prediction_type="v_prediction", zero_terminal_snr=True)
    z.scheduler.set_timesteps(4)
    assert z.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # trailing: starts at t = T
    assert float(z.scheduler.alphas_cumprod[-1]) == 0.0
    assert z.scheduler.config.prediction_type == "v_prediction"
    # The models are shared, not copied.
    assert z.unet is tiny_components["unet"] and z.text_encoder is tiny_components["text_encoder"]


KOHYA_SAMPLERS = {  # kohya's --sample_sampler choices -> diffusers class (train_util.get_my_scheduler)
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_keeps_the_training_schedule(name):
    cfg = dict(SD15_SCHEDULER_CONFIG)
    scheduler = sampling_scheduler(cfg, name, prediction_type="v_prediction")
    assert type(scheduler).__name__ == (KOHYA_SAMPLERS.get(name) or "DPMSolverMultistepScheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.beta_schedule) == (
        0.00085, 0.012, "scaled_linear")
    if sampler_supports_zero_terminal_snr(name):
        z = sampling_scheduler(cfg, name, prediction_type="v_prediction", zero_terminal_snr=True)
        assert z.config.rescale_betas_zero_snr is True and z.config.timestep_spacing == "trailing"
    else:
        with pytest.raises(ValueError, match=f"sampler '{name}' cannot sample a zero-terminal-SNR model; use one of ddim, "):
            sampling_scheduler(cfg, name, zero_terminal_snr=True)


def test_sampler_names_are_kohyas_plus_karras():
    assert set(SAMPLERS) == set(KOHYA_SAMPLERS) | {"dpm++_2m_karras"}
    dpm = sampling_scheduler(dict(SD15_SCHEDULER_CONFIG), "dpmsolver++")
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2 and not dpm.config.use_karras_sigmas
    karras = sampling_scheduler(dict(SD15_SCHEDULER_CONFIG), "dpm++_2m_karras")
    assert karras.config.algorithm_type == "dpmsolver++" and karras.config.use_karras_sigmas
    assert {n for n in SAMPLERS if sampler_supports_zero_terminal_snr(n)} == {
        "ddim", "euler", "k_euler", "euler_a", "k_euler_a", "dpmsolver", "dpmsolver++", "dpm++_2m_karras"}
    with pytest.raises(ValueError, match="unknown sampler 'dpm3'"):
        sampling_scheduler(dict(SD15_SCHEDULER_CONFIG), "dpm3")


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmsolver++", "dpm++_2m_karras", "pndm", "lms", "heun",
                                  "dpm_2_a"])
def test_each_sampler_generates_deterministically_per_seed(tiny_components, name):
    pipe = _pipe(tiny_components, sampler=name)
    a = generate_decoded(pipe, ["a", "b"], [0, 1], steps=3, height=64, width=64)
    b = generate_decoded(pipe, ["a", "b"], [0, 1], steps=3, height=64, width=64)
    assert torch.isfinite(a).all() and torch.equal(a, b)  # ancestral ones too: their step noise is seeded
    assert (a[0] - a[1]).abs().max() > 1e-4


def test_generate_is_deterministic_per_seed(tiny_components):
    pipe = _pipe(tiny_components)
    a = generate_decoded(pipe, ["a", "b", "a"], [0, 1, 2], batch_size=2, **FAST)
    b = generate_decoded(pipe, ["a", "b", "a"], [0, 1, 2], batch_size=2, **FAST)
    assert a.shape == (3, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # Batching does not change an image (up to kernel rounding), nor does its position.
    single = generate_decoded(pipe, ["a"], [2], batch_size=1, **FAST)
    assert torch.allclose(single[0], a[2], atol=1e-4)
    swapped = generate_decoded(pipe, ["a", "b"], [2, 0], batch_size=3, **FAST)
    assert torch.allclose(swapped[0], a[2], atol=1e-4)
    # Different seed, different image; same seed different prompt also different.
    assert (a[0] - a[2]).abs().max() > 1e-3
    c = generate_decoded(pipe, ["b"], [0], **FAST)
    assert (c[0] - a[0]).abs().max() > 1e-6


def test_generate_returns_pil_matching_decode(tiny_components):
    pipe = _pipe(tiny_components)
    images = generate(pipe, ["a", "b"], [5, 6], **FAST)
    decoded = generate_decoded(pipe, ["a", "b"], [5, 6], **FAST)
    assert [im.size for im in images] == [(64, 64)] * 2 and all(im.mode == "RGB" for im in images)
    expected = np.round(to_unit_range(decoded) * 255).astype(np.uint8)
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), expected)


def test_to_unit_range_clamps_and_moves_channels():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    y = to_unit_range(x)
    assert y.shape == (1, 1, 5, 3)
    assert y[0, 0, :, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert np.asarray(to_pil(y)[0])[0, :, 1].tolist() == [0, 0, 128, 255, 255]


def test_generate_on_training_lora_model_keeps_modes_and_grads(tiny_components):
    from lora_offset.training.networks import add_lora, text_encoder_lora_config, unet_lora_config

    unet, te = tiny_components["unet"], tiny_components["text_encoder"]
    add_lora(unet, unet_lora_config(4, 4, dropout=0.5))
    add_lora(te, text_encoder_lora_config(4, 4))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    unet.train()
    te.train()
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    pipe = _pipe(tiny_components)
    a = generate_decoded(pipe, ["a"], [0], **FAST)
    b = generate_decoded(pipe, ["a"], [0], **FAST)
    assert torch.equal(a, b)  # dropout off while sampling
    assert unet.training and te.training and all(m.training for m in unet.modules())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == grads
    assert any(grads.values()) and not all(grads.values())
    # The LoRA is active: turning it off changes the image.
    unet.disable_adapters()
    c = generate_decoded(pipe, ["a"], [0], **FAST)
    assert (a - c).abs().max() > 1e-3


def test_eval_mode_restores_mixed_flags(tiny_components):
    unet = tiny_components["unet"]
    unet.train()
    unet.conv_in.eval()
    with eval_mode(unet, None):
        assert not any(m.training for m in unet.modules())
    assert unet.training and not unet.conv_in.training and unet.conv_out.training


def test_guidance_rescale_defaults_follow_the_schedule(tiny_components, monkeypatch):
    from diffusers import StableDiffusionPipeline

    seen = []
    original = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((kwargs["guidance_rescale"], kwargs["num_inference_steps"], kwargs["guidance_scale"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    generate_decoded(_pipe(tiny_components), ["a"], [0], **FAST)
    z = _pipe(tiny_components, prediction_type="v_prediction", zero_terminal_snr=True)
    out = generate_decoded(z, ["a"], [0], **FAST)
    generate_decoded(z, ["a"], [0], guidance_rescale=0.3, guidance_scale=3.0, negative_prompt=None, **FAST)
    assert seen == [(0.0, 2, 7.5), (0.7, 2, 7.5), (0.3, 2, 3.0)]
    assert torch.isfinite(out).all()


def test_generate_argument_errors(tiny_components):
    pipe = _pipe(tiny_components)
    with pytest.raises(ValueError, match="one seed per image"):
        generate(pipe, ["a", "b"], [0], **FAST)
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(pipe, ["a"], [0], steps=1, height=60, width=64)


def test_sample_filename_sorts_by_step():
    names = [sample_filename(s, i, p) for s, i, p in [(100, 0, "a"), (5, 1, "b"), (5, 0, "Z z!"), (1000, 0, "a")]]
    assert sorted(names) == [names[2], names[1], names[0], names[3]]
    assert sample_filename(5, 0, "A photo of sks/dog!") == "step000000005_00_a-photo-of-sks-dog.png"
    assert sample_filename(1, 2, "???") == "step000000001_02_prompt.png"


def test_save_samples(tmp_path):
    images = [Image.new("RGB", (8, 8), (i * 100, 0, 0)) for i in range(2)]
    paths = save_samples(images, tmp_path / "samples", 250, ["a dog", "a cat"])
    assert [p.name for p in paths] == ["step000000250_00_a-dog.png", "step000000250_01_a-cat.png"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == sorted(p.name for p in paths)
    with Image.open(paths[1]) as im:
        assert im.format == "PNG" and np.asarray(im)[0, 0].tolist() == [100, 0, 0]
    with pytest.raises(ValueError):
        save_samples(images, tmp_path, 1, ["only one"])


def test_merged_lora_samples_as_the_unmerged_adapter_and_restores_the_base_bit_for_bit(tiny_components):
    """eval and the range monitor sample with the LoRA merged into the weights (twice as fast on a CPU)."""
    from peft import LoraConfig

    from lora_offset.experiments.sample import build_pipeline, generate_decoded, merged_lora
    from lora_offset.training.networks import ADAPTER_NAME

    c = tiny_components
    c["unet"].add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]), ADAPTER_NAME)
    with torch.no_grad():  # a LoRA that changes the output: its up matrices are not zero
        for name, p in c["unet"].named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    base = {n: p.detach().clone() for n, p in c["unet"].named_parameters() if "lora_" not in n}
    pipe = build_pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], dict(c["scheduler"].config))
    kwargs = dict(steps=3, guidance_scale=5.0, height=64, width=64, batch_size=2)
    unmerged = generate_decoded(pipe, ["a photo"] * 2, [1, 2], **kwargs)
    with merged_lora(pipe.unet, pipe.text_encoder) as count:
        assert count == len([m for m in c["unet"].modules() if hasattr(m, "lora_A")]) > 0
        merged = generate_decoded(pipe, ["a photo"] * 2, [1, 2], **kwargs)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)  # the same model, rounded otherwise
    after = {n: p for n, p in c["unet"].named_parameters() if "lora_" not in n}
    assert all(torch.equal(after[n], base[n]) for n in base)  # the base weights exactly as before
    assert torch.equal(generate_decoded(pipe, ["a photo"] * 2, [1, 2], **kwargs), unmerged)  # and unmerged again
    from lora_offset.training.monitor import adapters_off

    with adapters_off(pipe.unet), merged_lora(pipe.unet) as count:  # the base model: nothing to merge
        assert count == 0
