"""network.weights: a LoRA started from a kohya, diffusers or PEFT file equals that file before the first step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lora_offset.cli import main
from lora_offset.config import NetworkConfig
from lora_offset.errors import UserError
from lora_offset.formats.kohya import kohya_state_dict, save_lora
from lora_offset.training import networks
from lora_offset.training.network_targets import UNET_ATTENTION_TARGETS
from tests.test_train import make_images, write_config


def trained_lora(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, te=True, seed=1):
    """Tiny components with a LoRA whose lora_up is not zero (as after training)."""
    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    networks.add_lora(c["unet"], networks.unet_lora_config(rank, alpha, conv_rank, conv_alpha))
    if te:
        networks.add_lora(c["text_encoder"], networks.text_encoder_lora_config(rank, alpha))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (c["unet"], c["text_encoder"]):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return c


def kohya_file(path, c, te=True):
    state = kohya_state_dict(c["unet"], c["text_encoder"] if te else None)
    save_lora(path, state, {"ss_network_module": "networks.lora"}, precision="fp32")
    return path


def fresh(net: NetworkConfig, overrides=None):
    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    overrides = overrides or {}
    networks.add_lora(c["unet"], networks.unet_lora_config(net.rank, net.alpha, net.conv_rank, net.conv_alpha,
                                                           overrides=overrides.get("unet")))
    if net.train_text_encoder:
        networks.add_lora(c["text_encoder"], networks.text_encoder_lora_config(
            net.rank, net.alpha, overrides=overrides.get("text_encoder")))
    return c


def test_dim_from_weights_starts_exactly_at_the_file(tmp_path):
    path = kohya_file(tmp_path / "start.safetensors", trained_lora(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0))
    start = networks.read_weights(str(path))
    net, overrides = networks.dims_from_weights(start, NetworkConfig(train_text_encoder=True, dim_from_weights=True))
    # A kohya file holds one alpha (2): the conv modules' own scale (1.0 / 2) is folded into their lora_up,
    # so the file reads as conv alpha 2 with that lora_up: the same delta.
    assert (net.rank, net.alpha, net.conv_rank, net.conv_alpha) == (4, 2.0, 2, 2.0)
    c = fresh(net, overrides)
    assert networks.load_weights(start, c["unet"], c["text_encoder"]) == len(start.modules)
    again = kohya_state_dict(c["unet"], c["text_encoder"])
    original = load_file(path)
    assert again.keys() == original.keys()
    for key in original:
        assert torch.equal(again[key], original[key]), key


def test_per_module_ranks_and_alphas_come_from_the_file(tmp_path):
    """A diffusers file with a rank/alpha pattern (one module rank 2, others 4): each module gets its own."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=UNET_ATTENTION_TARGETS,
                        rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn2.to_k": 1, "proj_in": 3})
    c["unet"].add_adapter(config)
    with torch.no_grad():
        for name, p in c["unet"].named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(c["unet"]),
                                              unet_lora_adapter_metadata=config.to_dict())
    start = networks.read_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))
    net, overrides = networks.dims_from_weights(start, NetworkConfig(dim_from_weights=True))
    assert (net.rank, net.alpha) == (4, 8.0)
    assert {v for v in overrides["unet"].values()} == {(2, 1.0), (4, 3.0)}
    ours = fresh(net, overrides)
    networks.load_weights(start, ours["unet"])
    torch.manual_seed(0)
    x, t, cond = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours["unet"](x, t, cond).sample, c["unet"](x, t, cond).sample, rtol=1e-5, atol=1e-6)


def test_a_different_alpha_is_folded_so_the_delta_is_the_files(tmp_path):
    source = trained_lora(rank=4, alpha=2.0, conv_rank=0, te=False)
    path = kohya_file(tmp_path / "start.safetensors", source, te=False)
    c = fresh(NetworkConfig(rank=4, alpha=8.0))  # same rank, another alpha: scale 2 instead of 0.5
    networks.load_weights(networks.read_weights(str(path)), c["unet"])
    torch.manual_seed(0)
    x, t, cond = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(c["unet"](x, t, cond).sample, source["unet"](x, t, cond).sample,
                                   rtol=1e-5, atol=1e-6)


def test_mismatches_are_one_error_naming_the_module(tmp_path):
    path = kohya_file(tmp_path / "start.safetensors", trained_lora(rank=4, alpha=2.0, conv_rank=0))
    start = networks.read_weights(str(path))
    c = fresh(NetworkConfig(rank=8, alpha=4.0, train_text_encoder=True))
    with pytest.raises(UserError, match=r"network.weights: .*start.safetensors: module lora_(unet|te)_\w+ has lora_down "
                                        r"\(4, \d+\) and lora_up \(\d+, 4\) \(rank 4\); this network's are \(8, \d+\) "
                                        r"and \(\d+, 8\) \(rank 8\): set network.rank"):
        networks.load_weights(start, c["unet"], c["text_encoder"])
    c = fresh(NetworkConfig(rank=4, alpha=2.0))
    with pytest.raises(UserError, match=r"module lora_te_text_model_encoder_layers_\w+ \(text encoder\) is not in "
                                        r"this network; set network.train_text_encoder = true"):
        networks.load_weights(start, c["unet"], None)
    conv = networks.read_weights(str(kohya_file(tmp_path / "conv.safetensors", trained_lora(conv_rank=2), te=False)))
    with pytest.raises(UserError, match=r"\(conv\) is not in this network; the file is a conv LoRA \(LoCon\)"):
        networks.load_weights(conv, fresh(NetworkConfig(rank=4, alpha=2.0))["unet"])


def test_training_from_weights_starts_at_them(tmp_path, tiny_model_dir, monkeypatch):
    """Through the CLI: at the first optimizer step the LoRA is the file's; after training, it moved on."""
    from lora_offset.training import train as train_module

    path = kohya_file(tmp_path / "start.safetensors", trained_lora(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0))
    original = load_file(path)
    seen = {}
    real = train_module.optimizer_step

    def first_step_check(parts, step):
        if step == 0:
            unet = parts.accelerator.unwrap_model(parts.unet)
            te = parts.accelerator.unwrap_model(parts.text_encoder)
            seen["start"] = kohya_state_dict(unet, te)
        return real(parts, step)

    monkeypatch.setattr(train_module, "optimizer_step", first_step_check)
    images = make_images(tmp_path / "img", 2)
    config = write_config(tmp_path, tiny_model_dir, images, training={"max_steps": 2},
                          network={"weights": str(path), "dim_from_weights": True, "train_text_encoder": True,
                                   "rank": 16, "alpha": 16.0})
    assert main(["train", "--config", str(config)]) == 0
    assert seen["start"].keys() == original.keys()
    for key in original:
        assert torch.equal(seen["start"][key], original[key]), key
    final = load_file(tmp_path / "out" / "tiny.safetensors")
    assert final.keys() == original.keys()
    assert any(not torch.equal(final[k], original[k]) for k in final if k.endswith("lora_up.weight"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")


def test_a_bad_weights_file_stops_before_the_model_loads(tmp_path, capsys):
    images = make_images(tmp_path / "img", 2)
    config = write_config(tmp_path, tmp_path / "no-model", images, network={"weights": str(tmp_path / "missing.safetensors")})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "network.weights" in err and "missing.safetensors" in err and "no-model" not in err
    config = write_config(tmp_path, tmp_path / "no-model", images, network={"dim_from_weights": True})
    assert main(["train", "--config", str(config)]) == 2
    assert "network.dim_from_weights = true needs network.weights" in capsys.readouterr().err
    config = write_config(tmp_path, tmp_path / "no-model", images, network={"type": "lokr", "weights": "x.safetensors"})
    assert main(["train", "--config", str(config)]) == 2
    assert "network.type = 'lokr' cannot start from it" in capsys.readouterr().err
