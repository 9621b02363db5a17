"""kohya / A1111 LoRA export: key names, alphas, loading in diffusers, metadata, hashes, refusals."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct
import warnings

import pytest
import safetensors
import safetensors.torch
import torch
from peft import LoraConfig

from lora_offset.errors import UserError
from lora_offset.formats.kohya import kohya_state_dict, save_lora
from lora_offset.formats.kohya_metadata import addnet_legacy_hash, addnet_model_hash, ss_metadata, sshs_hashes
from lora_offset.formats.keys import SUFFIXES, kohya_name
from lora_offset.training.networks import add_lora, text_encoder_lora_config, unet_lora_config

ATTENTION_BLOCK = "Transformer2DModel"
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def kohya_targets(model: torch.nn.Module, block_classes: tuple[str, ...]) -> list[str]:
    """kohya's own rule, derived from a model without LoRA: every Linear / Conv2d inside a block
    of one of `block_classes` (SD 1.x: Transformer2DModel for the default LoRA, ResnetBlock2D and
    the samplers for conv LoRA; CLIPAttention / CLIPMLP for the text encoder)."""
    names = []
    for block_name, block in model.named_modules():
        if type(block).__name__ in block_classes:
            for child_name, child in block.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and child_name:
                    names.append(f"{block_name}.{child_name}")
    return names


def expected_keys(prefix: str, module_names: list[str]) -> set[str]:
    return {f"{kohya_name(prefix, name)}.{suffix}" for name in module_names for suffix in SUFFIXES}


def randomize_lora(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Give lora_A and lora_B random values so that the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def peft_delta(module) -> torch.Tensor:
    """The weight change a PEFT LoRA layer applies: scaling * B @ A (conv: on flattened weights)."""
    a = module.lora_A["default"].weight.detach().double().flatten(1)
    b = module.lora_B["default"].weight.detach().double().flatten(1)
    return module.scaling["default"] * (b @ a)


def loader_delta(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """What every kohya loader (A1111, Forge, ComfyUI, kohya merge) applies: alpha / r * up @ down."""
    down = state[f"{key}.lora_down.weight"].double().flatten(1)
    up = state[f"{key}.lora_up.weight"].double().flatten(1)
    return state[f"{key}.alpha"].double().item() / down.shape[0] * (up @ down)


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def load_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)


@contextlib.contextmanager
def captured_warnings():
    """Collect every warning diffusers, transformers and PEFT emit (logging and warnings.warn).

    conftest sets the libraries' verbosity to "error"; raise it to "warning" for the duration.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    messages: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                messages.append(f"{record.name}: {record.getMessage()}")

    handler = ListHandler(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    old_diffusers, old_transformers = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    transformers_logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"warnings.warn: {w.message}" for w in caught)
    finally:
        for lg, level in zip(loggers, old_levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        diffusers_logging.set_verbosity(old_diffusers)
        transformers_logging.set_verbosity(old_transformers)


def model_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700])
    ids = torch.randint(0, 500, (2, 12), generator=generator)
    return latents, timesteps, ids


def outputs(pipe, latents, timesteps, ids):
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        noise_pred = pipe.unet(latents, timesteps, hidden).sample
    return hidden, noise_pred


def metadata_for_tests(**overrides) -> dict[str, str]:
    kwargs = dict(output_name="sks-dog", network_dim=4, network_alpha=1.0, steps=10, epoch=1, resolution=512,
                  learning_rate=1e-4, optimizer="AdamW", num_train_images=5, started_at=1.7e9,
                  finished_at=1.7e9 + 60)
    kwargs.update(overrides)
    return ss_metadata(**kwargs)


def file_metadata(path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return f.metadata()


# --------------------------------------------------------------------------------------------
# key names and counts
# --------------------------------------------------------------------------------------------

def test_unet_export_has_kohyas_192_modules(tiny_components):
    unet = tiny_components["unet"]
    expected_modules = kohya_targets(unet, (ATTENTION_BLOCK,))
    assert len(expected_modules) == 192
    add_lora(unet, unet_lora_config(rank=4, alpha=1.0))
    state = kohya_state_dict(unet)

    assert len(state) == 192 * 3
    assert set(state) == expected_keys("lora_unet", expected_modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj.alpha" in state
    modules = dict(unet.named_modules())
    for name in expected_modules:
        key, base = kohya_name("lora_unet", name), modules[name].base_layer
        assert state[f"{key}.lora_down.weight"].shape[0] == 4
        assert state[f"{key}.lora_up.weight"].shape[1] == 4
        assert state[f"{key}.alpha"].shape == ()
        assert state[f"{key}.alpha"].item() == 1.0
        out_features = base.out_features if isinstance(base, torch.nn.Linear) else base.out_channels
        assert state[f"{key}.lora_up.weight"].shape[0] == out_features
    assert all(t.dtype == torch.float32 for t in state.values())


def test_text_encoder_adds_72_modules_with_text_model_in_the_key(tiny_components):
    unet, text_encoder = tiny_components["unet"], tiny_components["text_encoder"]
    te_modules = kohya_targets(text_encoder, ("CLIPAttention", "CLIPMLP"))
    assert len(te_modules) == 72
    add_lora(unet, unet_lora_config(rank=4, alpha=1.0))
    add_lora(text_encoder, text_encoder_lora_config(rank=4, alpha=1.0))
    state = kohya_state_dict(unet, text_encoder)

    assert len({key.partition(".")[0] for key in state}) == 264
    te_keys = {key for key in state if key.startswith("lora_te_")}
    assert te_keys == expected_keys("lora_te", te_modules)
    assert all(key.startswith("lora_te_text_model_encoder_layers_") for key in te_keys)
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2.lora_up.weight" in state


def test_conv_lora_adds_resnet_and_sampler_modules_with_conv_shapes(tiny_components):
    unet = tiny_components["unet"]
    attention = kohya_targets(unet, (ATTENTION_BLOCK,))
    conv = kohya_targets(unet, CONV_BLOCKS)
    add_lora(unet, unet_lora_config(rank=4, alpha=1.0, conv_rank=2, conv_alpha=1.0))
    state = kohya_state_dict(unet)

    assert set(state) == expected_keys("lora_unet", attention + conv)
    assert len(conv) > 0 and len(state) == 3 * (192 + len(conv))
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[f"{key}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert state[f"{key}.lora_up.weight"].shape == (32, 2, 1, 1)
    key = "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert state[f"{key}.lora_down.weight"].shape == (2, 64, 3, 3)
    # time_emb_proj (Linear) and the 1x1 conv_shortcut get rank, not conv_rank, as in kohya
    assert state["lora_unet_down_blocks_1_resnets_0_time_emb_proj.lora_down.weight"].shape == (4, 128)
    assert state["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape == (4, 32, 1, 1)


def test_state_dict_is_a_copy(tiny_components):
    unet = tiny_components["unet"]
    add_lora(unet, unet_lora_config(rank=4, alpha=4.0))
    state = kohya_state_dict(unet)
    layer = unet.down_blocks[0].attentions[0].proj_in
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].fill_(123.0)
    assert not torch.any(layer.lora_A["default"].weight == 123.0)


# --------------------------------------------------------------------------------------------
# alpha: every loader's math gives the trained delta
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True])
def test_every_module_gives_the_trained_delta_under_scale_alpha_over_r(tiny_components, use_rslora):
    """Mixed alphas/ranks (conv_alpha/conv_rank != alpha/rank, alpha_pattern on attention and
    text-encoder modules, rsLoRA): alpha / r * up @ down must equal PEFT's scaling * B @ A."""
    unet, text_encoder = tiny_components["unet"], tiny_components["text_encoder"]
    unet_config = unet_lora_config(rank=4, alpha=1.0, conv_rank=2, conv_alpha=3.0)
    unet_config.alpha_pattern = {**unet_config.alpha_pattern, r".*attn2\.to_k": 5.0}
    te_config = text_encoder_lora_config(rank=8, alpha=2.0)
    te_config.alpha_pattern = {r".*mlp\.fc1": 6.0}
    unet_config.use_rslora = te_config.use_rslora = use_rslora
    add_lora(unet, unet_config)
    add_lora(text_encoder, te_config)
    randomize_lora(unet, seed=1)
    randomize_lora(text_encoder, seed=2)
    state = kohya_state_dict(unet, text_encoder)

    # one alpha in the whole file: the most common module value (attention alpha 1 * r/sqrt(r))
    alphas = {t.item() for key, t in state.items() if key.endswith(".alpha")}
    assert len(alphas) == 1 and alphas.pop() == pytest.approx(2.0 if use_rslora else 1.0)
    checked = 0
    for prefix, model in (("lora_unet", unet), ("lora_te", text_encoder)):
        for name, module in lora_layers(model).items():
            expected = peft_delta(module)
            # the folded lora_up is rounded to float32 once: errors ~1e-7 of the delta's size
            torch.testing.assert_close(loader_delta(state, kohya_name(prefix, name)), expected,
                                       rtol=1e-6, atol=1e-6 * expected.abs().max().item())
            checked += 1
    assert checked == len(state) // 3


def test_uniform_alpha_is_written_as_is_without_folding(tiny_components):
    unet = tiny_components["unet"]
    add_lora(unet, unet_lora_config(rank=16, alpha=8.0))
    randomize_lora(unet, seed=3)
    state = kohya_state_dict(unet)
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_v
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"
    assert state[f"{key}.alpha"].item() == 8.0
    assert torch.equal(state[f"{key}.lora_up.weight"], layer.lora_B["default"].weight)
    assert torch.equal(state[f"{key}.lora_down.weight"], layer.lora_A["default"].weight)


# --------------------------------------------------------------------------------------------
# diffusers load_lora_weights reproduces the trained adapter
# --------------------------------------------------------------------------------------------

def trained_pipeline(model_dir, conv: bool, alpha_pattern: bool = False):
    """The base model with a random (non-zero) LoRA on UNet and text encoder: 'the trained adapter'."""
    pipe = load_pipeline(model_dir)
    unet_config = unet_lora_config(rank=4, alpha=1.0, conv_rank=2 if conv else 0, conv_alpha=3.0)
    te_config = text_encoder_lora_config(rank=4, alpha=2.0)
    if alpha_pattern:
        unet_config.alpha_pattern = {**unet_config.alpha_pattern, r".*attn2\.to_k": 5.0}
        te_config.alpha_pattern = {r".*self_attn\.q_proj": 6.0}
    add_lora(pipe.unet, unet_config)
    add_lora(pipe.text_encoder, te_config)
    randomize_lora(pipe.unet, seed=4)
    randomize_lora(pipe.text_encoder, seed=5)
    return pipe


@pytest.mark.parametrize("conv,alpha_pattern", [(False, False), (True, True)], ids=["plain", "conv-mixed-alpha"])
def test_diffusers_loads_the_file_and_reproduces_the_adapter(tiny_model_dir, tmp_path, conv, alpha_pattern):
    trained = trained_pipeline(tiny_model_dir, conv=conv, alpha_pattern=alpha_pattern)
    path = save_lora(tmp_path / "a.safetensors", kohya_state_dict(trained.unet, trained.text_encoder),
                     metadata_for_tests(), precision="fp32")
    inputs = model_inputs()
    expected_hidden, expected_pred = outputs(trained, *inputs)

    pipe = load_pipeline(tiny_model_dir)
    base_hidden, base_pred = outputs(pipe, *inputs)
    with captured_warnings() as messages:
        pipe.load_lora_weights(str(path))
    assert messages == []
    n_unet = len(lora_layers(trained.unet))
    assert len(lora_layers(pipe.unet)) == n_unet == (192 + 85 if conv else 192)
    assert len(lora_layers(pipe.text_encoder)) == 72

    hidden, pred = outputs(pipe, *inputs)
    # the adapter matters ...
    assert (expected_hidden - base_hidden).abs().max() > 0.1
    assert (expected_pred - base_pred).abs().max() > 0.05
    # ... and the loaded file reproduces it (text encoder alone, then the UNet on the same states)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        pred_same_states = pipe.unet(inputs[0], inputs[1], expected_hidden).sample
        expected_same_states = trained.unet(inputs[0], inputs[1], expected_hidden).sample
    torch.testing.assert_close(pred_same_states, expected_same_states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred, expected_pred, rtol=1e-4, atol=1e-5)


def test_per_module_alphas_are_misread_by_diffusers(tiny_model_dir, tmp_path):
    """Why export.py writes one alpha per file: diffusers 0.42 drops per-module alphas of UNet
    attention projections and text-encoder modules that differ from the most common alpha.
    If this starts failing, diffusers was fixed; the fold in export.py stays correct anyway."""
    trained = trained_pipeline(tiny_model_dir, conv=False, alpha_pattern=True)
    state = kohya_state_dict(trained.unet, trained.text_encoder)
    for prefix, model in (("lora_unet", trained.unet), ("lora_te", trained.text_encoder)):
        for name, module in lora_layers(model).items():  # the "natural" file: alpha = scaling * r
            key = kohya_name(prefix, name)
            state[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().clone()
            state[f"{key}.alpha"] = torch.tensor(module.scaling["default"] * module.r["default"])
    path = tmp_path / "naive.safetensors"
    safetensors.torch.save_file(state, str(path))
    pipe = load_pipeline(tiny_model_dir)
    with captured_warnings() as messages:
        pipe.load_lora_weights(str(path))
    assert any("alpha_pattern keys did not match" in m for m in messages)
    to_k = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    adapter = next(iter(to_k.scaling))
    assert to_k.scaling[adapter] == pytest.approx(1.0 / 4)  # trained with 5 / 4
    q_proj = dict(pipe.text_encoder.named_modules())["encoder.layers.0.self_attn.q_proj"]
    assert q_proj.scaling[adapter] == pytest.approx(2.0 / 4)  # trained with 6 / 4


def test_fp16_file_loads_in_diffusers(tiny_model_dir, tmp_path):
    trained = trained_pipeline(tiny_model_dir, conv=True)
    path = save_lora(tmp_path / "a.safetensors", kohya_state_dict(trained.unet), metadata_for_tests())
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    latents, timesteps, ids = model_inputs()
    pipe = load_pipeline(tiny_model_dir)
    with torch.no_grad():
        base_hidden = pipe.text_encoder(ids)[0]
    with captured_warnings() as messages:
        pipe.load_lora_weights(str(path))
    # a UNet-only file: diffusers' one note is that the text encoder got nothing
    assert [m for m in messages if "No LoRA keys associated to CLIPTextModel" not in m] == []
    with torch.no_grad():
        expected = trained.unet(latents, timesteps, base_hidden).sample
        loaded = pipe.unet(latents, timesteps, base_hidden).sample
    scale = expected.abs().max().item()
    assert (loaded - expected).abs().max().item() < 2e-3 * scale + 1e-3


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------

def test_nan_in_the_adapter_is_refused_with_the_key_named(tiny_components):
    unet = tiny_components["unet"]
    add_lora(unet, unet_lora_config(rank=4, alpha=1.0))
    with torch.no_grad():
        unet.mid_block.attentions[0].proj_out.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="lora_unet_mid_block_attentions_0_proj_out.lora_up.weight .*non-finite"):
        kohya_state_dict(unet)


def test_save_refuses_non_finite_and_fp16_overflow_and_writes_nothing(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous file")
    good = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.alpha": torch.tensor(2.0)}
    with pytest.raises(UserError, match=r"lora_unet_x.lora_down.weight holds 1 non-finite"):
        save_lora(target, {**good, "lora_unet_x.lora_down.weight": torch.tensor([[1.0, float("inf")]])},
                  metadata_for_tests())
    with pytest.raises(UserError, match="overflow fp16: save with precision 'bf16' or 'fp32'"):
        save_lora(target, {**good, "lora_unet_x.lora_up.weight": torch.full((3, 2), 1e6)}, metadata_for_tests())
    assert target.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary left behind
    save_lora(target, {**good, "lora_unet_x.lora_up.weight": torch.full((3, 2), 1e6)}, metadata_for_tests(),
              precision="bf16")
    assert target.read_bytes() != b"previous file"


def test_dora_is_refused(tiny_components):
    unet = tiny_components["unet"]
    config = unet_lora_config(rank=4, alpha=1.0)
    config.use_dora = True
    add_lora(unet, config)
    with pytest.raises(UserError, match="DoRA"):
        kohya_state_dict(unet)


def test_base_rewriting_init_is_refused(tiny_components):
    text_encoder = tiny_components["text_encoder"]
    config = text_encoder_lora_config(rank=4, alpha=4.0)
    config.init_lora_weights = "pissa"
    add_lora(text_encoder, config)
    with pytest.raises(UserError, match="init_lora_weights='pissa'.*changes the base weights"):
        kohya_state_dict(None, text_encoder)


def test_lora_bias_and_missing_adapter_are_refused(tiny_components):
    unet, text_encoder = tiny_components["unet"], tiny_components["text_encoder"]
    with pytest.raises(UserError, match="no LoRA layers"):
        kohya_state_dict(unet)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], lora_bias=True)
    add_lora(text_encoder, config)
    with pytest.raises(UserError, match="lora_te_text_model_encoder_layers_0_self_attn_q_proj has a LoRA bias"):
        kohya_state_dict(None, text_encoder)


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------

NOISE = {
    "offset": 0.1, "adaptive_offset": 0.01, "offset_random_strength": True, "pyramid_iterations": 6,
    "pyramid_discount": 0.3, "input_perturbation": 0.05, "zero_terminal_snr": False, "min_snr_gamma": 5.0,
    "prediction_type": "epsilon",
}


def test_metadata_fields_are_strings_with_kohya_names():
    md = metadata_for_tests(
        network_dim=16, network_alpha=8, conv_dim=4, conv_alpha=1, train_text_encoder=True, steps=1500, epoch=10,
        resolution=(512, 640), learning_rate=1e-4, unet_lr=2e-4, text_encoder_lr=5e-5,
        optimizer="bitsandbytes.optim.adamw.AdamW8bit", num_train_images=200, num_reg_images=100,
        tag_frequency={"20_sks dog": {"sks dog": 20, "grass": 3}}, noise=NOISE, started_at=1700000000.5,
        finished_at=1700003600.25, seed=42, mixed_precision="fp16", prior_loss_weight=1.0,
        base_model_name="v1-5-pruned.safetensors")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_output_name": "sks-dog",
        "ss_training_started_at": "1700000000.5", "ss_training_finished_at": "1700003600.25",
        "ss_steps": "1500", "ss_epoch": "10", "ss_resolution": "(512, 640)", "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0002", "ss_text_encoder_lr": "5e-05",
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit", "ss_num_train_images": "200",
        "ss_num_reg_images": "100", "ss_seed": "42", "ss_mixed_precision": "fp16",
        "ss_prior_loss_weight": "1.0", "ss_sd_model_name": "v1-5-pruned.safetensors",
        "ss_noise_offset": "0.1", "ss_adaptive_noise_scale": "0.01", "ss_noise_offset_random_strength": "True",
        "ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.3", "ss_ip_noise_gamma": "0.05",
        "ss_zero_terminal_snr": "False", "ss_min_snr_gamma": "5.0",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "sks-dog",
        "modelspec.date": "2023-11-14T23:13:20", "modelspec.resolution": "512x640",
        "modelspec.prediction_type": "epsilon",
    }
    assert {k: md.get(k) for k in expected} == expected
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0"}
    assert json.loads(md["ss_tag_frequency"]) == {"20_sks dog": {"sks dog": 20, "grass": 3}}


def test_metadata_defaults_v_prediction_and_unet_only():
    md = metadata_for_tests(noise={"zero_terminal_snr": True, "prediction_type": "v_prediction"},
                            text_encoder_lr=5e-5)
    assert md["ss_base_model_version"] == "sd_v1_v"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.prediction_type"] == "v"
    assert md["ss_zero_terminal_snr"] == "True"
    assert md["ss_noise_offset"] == "None" and md["ss_min_snr_gamma"] == "None"
    assert md["ss_noise_offset_random_strength"] == "False"
    assert md["ss_network_args"] == "{}"
    assert md["ss_text_encoder_lr"] == "None"  # the text encoder was not trained
    assert md["ss_tag_frequency"] == "{}" and md["ss_resolution"] == "(512, 512)"
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        metadata_for_tests(noise={"prediction_type": "sample"})


# --------------------------------------------------------------------------------------------
# saving and hashes
# --------------------------------------------------------------------------------------------

def big_state_dict() -> dict[str, torch.Tensor]:
    """Larger than 0x110000 bytes in fp16, so the legacy hash window lies inside the tensor data."""
    generator = torch.Generator().manual_seed(0)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(16, 40000, generator=generator),
        "lora_unet_a.lora_up.weight": torch.randn(320, 16, generator=generator),
        "lora_unet_a.alpha": torch.tensor(8.0),
    }


def independent_hashes(data: bytes) -> tuple[str, str]:
    (header_length,) = struct.unpack("<Q", data[:8])
    body = data[8 + header_length:]
    with_seek = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return hashlib.sha256(body).hexdigest(), with_seek


def test_hashes_match_an_independent_computation_on_a_written_file(tmp_path):
    state = big_state_dict()
    md = {**metadata_for_tests(), "custom.note": "not hashed"}
    path = save_lora(tmp_path / "a.safetensors", state, md)
    written = file_metadata(path)

    # kohya: hash the file as written with only the ss_* metadata (cast to the save precision)
    reference = tmp_path / "ss-only.safetensors"
    safetensors.torch.save_file({k: v.half() for k, v in state.items()}, str(reference),
                                metadata={k: v for k, v in md.items() if k.startswith("ss_")})
    data = reference.read_bytes()
    assert len(data) > 0x110000
    model_hash, legacy_hash = independent_hashes(data)
    assert written["sshs_model_hash"] == model_hash
    assert written["sshs_legacy_hash"] == legacy_hash
    assert legacy_hash != hashlib.sha256(b"").hexdigest()[:8]
    # A1111's addnet hash of the real file (tensor bytes only) is the same model hash
    assert independent_hashes(path.read_bytes())[0] == model_hash
    # the pure functions agree on bytes
    assert (addnet_model_hash(data), addnet_legacy_hash(data)) == (model_hash, legacy_hash)
    # non-ss metadata does not move the hashes; ss metadata moves the legacy window
    assert sshs_hashes({k: v.half() for k, v in state.items()}, {**md, "modelspec.title": "other"}) == (
        model_hash, legacy_hash)
    assert sshs_hashes({k: v.half() for k, v in state.items()}, {**md, "ss_output_name": "x" * 50})[1] != legacy_hash
    # everything else of the metadata is in the file
    assert {k: written[k] for k in md} == md


@pytest.mark.parametrize("precision,dtype", [(None, torch.float16), ("bf16", torch.bfloat16),
                                             ("fp32", torch.float32)])
def test_precision_casts_every_tensor_alphas_too(tmp_path, precision, dtype):
    state = big_state_dict()
    kwargs = {} if precision is None else {"precision": precision}
    path = save_lora(tmp_path / "nested" / "a.safetensors", state, metadata_for_tests(), **kwargs)
    loaded = safetensors.torch.load_file(str(path))
    assert set(loaded) == set(state)
    assert {t.dtype for t in loaded.values()} == {dtype}
    assert loaded["lora_unet_a.alpha"].shape == () and loaded["lora_unet_a.alpha"].item() == 8.0
    torch.testing.assert_close(loaded["lora_unet_a.lora_up.weight"].float(), state["lora_unet_a.lora_up.weight"],
                               rtol=1e-2, atol=1e-2)


def test_alpha_rounding_of_the_save_precision_is_taken_out_of_lora_up(tmp_path):
    """bf16 stores alpha 0.3 as 0.30078: without compensation every module would be 0.26 % too strong."""
    generator = torch.Generator().manual_seed(0)
    up, down = torch.randn(256, 4, generator=generator), torch.randn(4, 64, generator=generator)
    state = {"lora_unet_m.lora_down.weight": down, "lora_unet_m.lora_up.weight": up,
             "lora_unet_m.alpha": torch.tensor(0.3)}
    loaded = safetensors.torch.load_file(str(save_lora(tmp_path / "a.safetensors", state, metadata_for_tests(),
                                                       precision="bf16")))
    assert loaded["lora_unet_m.alpha"].item() == pytest.approx(0.30078125)
    exact = 0.3 / 4 * up.double()
    stored = loaded["lora_unet_m.alpha"].double().item() / 4 * loaded["lora_unet_m.lora_up.weight"].double()
    systematic = (stored * exact).sum() / (exact * exact).sum()  # the common scale factor of the module
    assert abs(systematic.item() - 1) < 5e-4


def test_alpha_is_the_number_the_user_typed(tiny_components):
    unet = tiny_components["unet"]
    config = unet_lora_config(rank=3, alpha=0.3)
    config.rank_pattern = {r".*attn1\.to_q": 7}
    add_lora(unet, config)
    state = kohya_state_dict(unet)
    assert {t.item() for k, t in state.items() if k.endswith(".alpha")} == {torch.tensor(0.3).item()}
    # same alpha at another rank: nothing folded, the scale is alpha / 7 there, as in PEFT
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert state[f"{key}.lora_down.weight"].shape[0] == 7
    assert torch.equal(state[f"{key}.lora_up.weight"], layer.lora_B["default"].weight)


def test_bad_precision_and_non_string_metadata_are_refused(tmp_path):
    with pytest.raises(UserError, match="precision 'fp8'"):
        save_lora(tmp_path / "a.safetensors", big_state_dict(), metadata_for_tests(), precision="fp8")
    with pytest.raises(TypeError, match="ss_steps"):
        save_lora(tmp_path / "a.safetensors", big_state_dict(), {"ss_steps": 10})
    assert not any(tmp_path.iterdir())
