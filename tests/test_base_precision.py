"""model.base_precision: the frozen UNet stored as fp16 / fp8 / NF4 while a LoRA trains on it (CPU, tiny model)."""

from __future__ import annotations

import copy
import json
import logging
import typing

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lora_offset.formats import kohya
from lora_offset.training import base_precision
from lora_offset.training import networks as lora
from lora_offset.cli import main
from lora_offset.config import Config, ModelConfig
from lora_offset.errors import UserError
from tests.test_train import make_images, module_names, write_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "10_sks dog", 4)


def test_the_config_key_takes_exactly_the_documented_values():
    hint = typing.get_type_hints(ModelConfig)["base_precision"]
    assert typing.get_args(hint) == base_precision.PRECISIONS
    assert ModelConfig().base_precision == "auto"
    with pytest.raises(UserError, match=r"model.base_precision must be one of 'auto' \| 'fp16' .* got 'int4'"):
        Config.from_dict({"model": {"pretrained": "x", "base_precision": "int4"},
                          "dataset": {"subsets": [{"image_dir": "."}]}}, source="my.toml")


def lora_unet(tiny_components, conv_rank=2):
    """The tiny UNet with a LoRA whose up weights are non-zero, so that every LoRA weight gets a gradient."""
    unet = tiny_components["unet"].requires_grad_(False)
    torch.manual_seed(1)
    params = lora.add_lora(unet, lora.unet_lora_config(4, 4.0, conv_rank=conv_rank, conv_alpha=2.0))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    return unet


def dequantized_copy(plain: nn.Module, stored: nn.Module) -> nn.Module:
    """`plain` (same architecture, ordinary layers) with every frozen Linear/Conv2d weight and bias replaced by
    what `stored`'s layer computes with."""
    ref = copy.deepcopy(plain)
    layers = dict(stored.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            if type(module) in (nn.Linear, nn.Conv2d) and "lora_" not in name:
                module.weight.copy_(base_precision.dequantized_weight(layers[name]).reshape(module.weight.shape))
                if module.bias is not None:
                    module.bias.copy_(layers[name].bias.float())
    return ref


def inputs():
    g = torch.Generator().manual_seed(3)
    # 16x16 latents: at 8x8 the mid block sees one token and its attention gets no gradient.
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 500]), torch.randn(2, 77, 32, generator=g)


def lora_grads(unet):
    unet.zero_grad(set_to_none=True)
    out = unet(*inputs()).sample
    out.pow(2).mean().backward()
    return out.detach(), [p.grad.clone() for n, p in unet.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("precision", ["fp16", "fp8", "nf4"])
def test_stored_base_trains_exactly_like_its_dequantized_weights(tiny_components, precision):
    """Forward and LoRA gradients (through gradient checkpointing, conv LoRA included) equal those of an
    ordinary fp32 UNet holding the dequantized weights: the storage changes the weights, not the math."""
    plain = lora_unet(tiny_components)
    stored = copy.deepcopy(plain)
    base_precision.apply(stored, precision, torch.float32)
    reference = dequantized_copy(plain, stored)
    for model in (stored, reference):
        model.enable_gradient_checkpointing()
        model.train()
    out, grads = lora_grads(stored)
    ref_out, ref_grads = lora_grads(reference)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert len(grads) == len(ref_grads) > 400 and all(g.abs().sum() > 0 for g in ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)
    # ... and the storage really is what it says: the weights moved away from the fp32 originals.
    plain_out, _ = lora_grads(plain)
    assert not torch.allclose(out, plain_out, atol=1e-4)


def test_every_frozen_layer_is_stored_and_the_lora_is_not(tiny_components):
    import bitsandbytes as bnb

    unet = lora_unet(tiny_components)
    linears = sum(1 for n, m in unet.named_modules() if type(m) is nn.Linear and "lora_" not in n)
    convs = sum(1 for n, m in unet.named_modules() if type(m) is nn.Conv2d and "lora_" not in n)
    fp8 = copy.deepcopy(unet)
    base_precision.apply(fp8, "fp8", torch.float32)
    for name, p in fp8.named_parameters():
        is_norm = "norm" in name
        expected = torch.float32 if "lora_" in name or is_norm else torch.float8_e4m3fn
        assert p.dtype == expected, name
    nf4 = copy.deepcopy(unet)
    assert base_precision.quantize_nf4(nf4, torch.float32) == linears + convs
    kinds = [type(m) for m in nf4.modules()]
    assert kinds.count(bnb.nn.Linear4bit) == linears and kinds.count(base_precision.NF4Conv2d) == convs
    assert all(p.dtype == torch.float32 and p.requires_grad for n, p in nf4.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="int4"):
        base_precision.apply(unet, "int4", torch.float32)


def test_layerwise_casting_without_checkpointing_warns(tiny_components, caplog):
    unet = lora_unet(tiny_components)
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        base_precision.apply(copy.deepcopy(unet), "fp8", torch.float32)
        assert "gradient_checkpointing = false" in caplog.text
        caplog.clear()
        unet.enable_gradient_checkpointing()
        base_precision.apply(copy.deepcopy(unet), "fp8", torch.float32)
        base_precision.apply(copy.deepcopy(unet), "nf4", torch.float32)
        assert caplog.text == ""


def test_auto_and_the_training_dtype_change_nothing(tiny_components):
    unet = lora_unet(tiny_components)
    before = {n: p.clone() for n, p in unet.state_dict().items()}
    base_precision.apply(unet, "auto", torch.float32)
    base_precision.apply(unet, "fp32", torch.float32)
    assert not any(hasattr(m, "_diffusers_hook") for m in unet.modules())
    assert all(torch.equal(before[n], p) for n, p in unet.state_dict().items())


def test_frozen_bytes_per_weight():
    big = nn.Sequential(nn.Linear(1024, 1024, bias=False), nn.Conv2d(64, 128, 3, bias=False)).requires_grad_(False)
    weights = 1024 * 1024 + 128 * 64 * 9
    assert base_precision.frozen_bytes(big) == 4 * weights
    nf4 = copy.deepcopy(big)
    base_precision.quantize_nf4(nf4, torch.float32)
    # 4 bits per weight, plus one 8-bit absmax per 64 weights and the small second-level statistics
    assert 0.5 * weights < base_precision.frozen_bytes(nf4) < 0.52 * weights
    trainable = nn.Linear(8, 8)  # requires_grad: not frozen, not counted
    assert base_precision.frozen_bytes(trainable) == 0


def test_nf4_unet_still_trains_after_an_inference_forward(tiny_components):
    """A sample image mid-training runs the UNet in eval mode without gradients; on AVX512-BF16 CPUs that would
    make bitsandbytes repack Linear4bit into an inference-only layout, which has no backward."""
    unet = lora_unet(tiny_components)
    base_precision.apply(unet, "nf4", torch.float32)
    unet.train()
    _, before = lora_grads(unet)
    unet.eval()
    with torch.no_grad():
        unet(*inputs())
    unet.train()
    _, after = lora_grads(unet)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)


def test_export_is_the_delta_against_the_dequantized_weights(tiny_components):
    """The kohya file written from an NF4-trained UNet, merged into the dequantized base, gives the trained
    model's output: the file holds the delta the LoRA learned on top of the weights it saw."""
    from lora_offset.formats.keys import UNET_PREFIX, kohya_name
    from lora_offset.lowrank import lora_delta

    plain = lora_unet(tiny_components)
    stored = copy.deepcopy(plain)
    base_precision.apply(stored, "nf4", torch.float32)
    state = kohya.kohya_state_dict(stored)
    modules = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")})
    assert len(modules) > 192  # attention + conv LoRA

    merged = dequantized_copy(plain, stored)
    layers = {kohya_name(UNET_PREFIX, n.removesuffix(".base_layer")): m for n, m in merged.named_modules()
              if n.endswith(".base_layer")}
    with torch.no_grad():
        for key in modules:
            down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
            weight = layers[key].weight
            weight += lora_delta(down, up, float(state[f"{key}.alpha"]) / down.shape[0]).reshape(weight.shape)
    for model in (stored, merged):
        model.eval()
    with torch.no_grad():
        merged.disable_adapters()
        torch.testing.assert_close(merged(*inputs()).sample, stored(*inputs()).sample, rtol=1e-4, atol=1e-5)


def test_metadata_keys():
    assert base_precision.metadata("fp8", torch.float16) == {
        "ss_fp8_base": "False", "ss_fp8_base_unet": "True", "lora_offset.base_precision": "fp8"}
    assert base_precision.metadata("nf4", torch.bfloat16)["lora_offset.base_precision"] == "nf4"
    assert base_precision.metadata("nf4", torch.bfloat16)["ss_fp8_base_unet"] == "False"
    assert base_precision.metadata("auto", torch.float32)["lora_offset.base_precision"] == "fp32"
    assert base_precision.metadata("auto", torch.float16)["lora_offset.base_precision"] == "fp16"
    assert base_precision.quantized_base({"lora_offset.base_precision": "nf4"}) == "nf4"
    assert base_precision.quantized_base({"ss_fp8_base": "True"}) == "fp8"  # kohya --fp8_base
    assert base_precision.quantized_base({"ss_fp8_base_unet": "True"}) == "fp8"
    assert base_precision.quantized_base({"ss_fp8_base": "False", "lora_offset.base_precision": "fp16"}) is None
    assert base_precision.quantized_base({}) is None


# ---------------------------------------------------------------------------------------------------
# Through the command line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, images):
    """{precision: adapter path} trained for 3 steps through `lora-offset train` with an fp8 and an NF4 base."""
    out = {}
    for precision in ("fp8", "nf4"):
        folder = tmp_path_factory.mktemp(f"train-{precision}")
        config = write_config(folder, tiny_model_dir, images, model={"base_precision": precision},
                              network={"conv_rank": 2, "conv_alpha": 1.0},
                              training={"optimizer": "adamw8bit", "gradient_checkpointing": True})
        assert main(["train", "--config", str(config)]) == 0
        out[precision] = folder / "out" / "tiny.safetensors"
    return out


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_train_cli_with_a_quantized_base_exports_a_kohya_lora(trained, precision):
    path = trained[precision]
    modules = module_names(path)
    conv = {m for m in modules if "resnets" in m or "samplers" in m}
    assert len(modules) - len(conv) == 192 and conv  # attention LoRA + conv LoRA, kohya names
    assert all(s == {"lora_down.weight", "lora_up.weight", "alpha"} for s in modules.values())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if k.endswith("lora_up.weight"))
    assert meta["lora_offset.base_precision"] == precision
    assert meta["ss_fp8_base_unet"] == str(precision == "fp8") and meta["ss_fp8_base"] == "False"
    assert meta["ss_network_dim"] == "4" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_merge_says_the_lora_was_trained_against_a_quantized_base(trained, tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "merged"
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        assert main(["merge", "--base", str(tiny_model_dir), "--lora", f"{trained['nf4']}:0.5",
                     "--out", str(out)]) == 0
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("note:")]
    assert len(notes) == 1 and "tiny.safetensors" in notes[0] and "NF4" in notes[0]
    assert "dequantized" in notes[0]
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["lora_offset.merged_loras"])
    assert record[0]["trained_on_base_precision"] == "nf4"


def test_a_lora_trained_on_a_quantized_base_has_the_fp16_base_loss(tmp_path, tiny_model_dir, images):
    """Same data, noise and LoRA init; only the frozen UNet's storage differs. The loss over the last steps
    of a short run stays within 5 % of the fp16-stored base's (measured on one machine: fp8 +1.2 %, NF4 -1.1 %)."""
    from lora_offset.config import load_config
    from lora_offset.training.train import train

    class Losses:
        def __init__(self):
            self.values = []

        def on_step_start(self, step):
            pass

        def on_step_end(self, step, loss):
            self.values.append(loss)

    last = {}
    for precision in ("fp16", "fp8", "nf4"):
        config = write_config(tmp_path / precision, tiny_model_dir, images, model={"base_precision": precision},
                              network={"rank": 8, "alpha": 8.0}, noise={"offset": 0.0},
                              training={"max_steps": 8, "learning_rate": 3e-3, "optimizer": "adamw",
                                        "save_state_every_steps": 0})
        hooks = Losses()
        train(load_config(config), hooks=hooks)
        assert len(hooks.values) == 8
        last[precision] = sum(hooks.values[-4:]) / 4
    for precision in ("fp8", "nf4"):
        assert abs(last[precision] - last["fp16"]) <= 0.05 * last["fp16"], last


def test_sd15_unet_is_mostly_convolution_weights():
    """Why NF4 must cover convolutions (docs/PERFORMANCE.md): 63 % of SD 1.5's UNet weights are 3x3 convolutions
    and 31 % Linear layers, so a Linear-only NF4 UNet would keep about 0.77x of its fp16 bytes."""
    from lora_offset.sd15 import build_sd15

    unet = build_sd15("unet", "meta")
    total = sum(p.numel() for p in unet.parameters())
    conv3 = sum(m.weight.numel() + m.bias.numel() for m in unet.modules()
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    linear = sum(sum(p.numel() for p in m.parameters()) for m in unet.modules() if isinstance(m, nn.Linear))
    assert 0.62 < conv3 / total < 0.64 and 0.31 < linear / total < 0.32
    nf4_bytes_per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, 8-bit absmax per 64, fp32 absmax per 256 blocks
    linear_only = (linear * nf4_bytes_per_weight + (total - linear) * 2) / (total * 2)
    assert 0.76 < linear_only < 0.78
