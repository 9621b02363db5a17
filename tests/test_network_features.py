"""The network features of issue 23 in lora-offset's own TOML (network.* keys): target presets, and the
LyCORIS network_args of `lora-offset kohya` giving the same adapter as those keys."""

from __future__ import annotations

import json
import re

import pytest
import toml
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_offset.cli import main
from lora_offset.config import NetworkConfig
from lora_offset.formats import loaders
from lora_offset.formats.kohya import kohya_state_dict
from lora_offset.formats.lycoris import lycoris_state_dict
from lora_offset.training import network_targets, networks
from lora_offset.training.network_regularizers import adapter_layers, factors, scale_weight_norms
from tests.test_kohya_command import documented_command, print_config
from tests.test_train import make_images, write_config

LOADERS = ("a1111", "forge", "comfyui")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "img", 2)


@pytest.fixture(scope="module")
def sd15_names():
    from lora_offset.sd15 import build_sd15

    return [n for n, _ in build_sd15("unet").named_modules()], [n for n, _ in build_sd15("text_encoder").named_modules()]


def injected(net: NetworkConfig, seed: int = 0) -> dict:
    """Tiny components with the network of `net` injected as the trainer does, lora_up / factors random."""
    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=seed)
    unet_config, te_config = networks.network_configs(net)
    networks.add_lora(c["unet"], unet_config)
    if te_config is not None:
        networks.add_lora(c["text_encoder"], te_config)
    torch.manual_seed(seed + 1)
    for model in (c["unet"], c["text_encoder"]):
        for name, p in model.named_parameters():
            if networks.is_adapter_parameter(name):
                p.data.normal_(0, 0.05)
    return c


def exported(c: dict, net: NetworkConfig) -> dict[str, torch.Tensor]:
    te = c["text_encoder"] if net.train_text_encoder else None
    return kohya_state_dict(c["unet"], te) if net.type == "lora" else lycoris_state_dict(c["unet"], te)


# --------------------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("preset, conv, counts", [
    ("kohya", False, (192, 72)), ("kohya", True, (278, 72)), ("attn-only", False, (128, 48)),
    ("attn-mlp", False, (192, 72)), ("full", False, (230, 72)), ("full", True, (282, 72))])
def test_presets_select_lycoris_module_sets_on_sd15(sd15_names, preset, conv, counts):
    unet, te = sd15_names
    target, conv_target = network_targets.unet_targets(preset, conv)
    chosen = [n for n in unet if re.fullmatch(target, n)]
    assert (len(chosen), sum(bool(re.fullmatch(network_targets.text_encoder_targets(preset), n)) for n in te)) == counts
    if preset == "attn-only":
        assert {n.rsplit(".", 1)[-1] for n in chosen} == {"to_q", "to_k", "to_v", "0"}
    if preset == "full":  # LyCORIS's full: the time embedding too, and with convs conv_in / conv_out
        assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= set(chosen)
        assert ({"conv_in", "conv_out"} <= set(chosen)) == conv
        assert {n for n in chosen if re.fullmatch(conv_target or "(?!)", n)} >= ({"conv_in", "conv_out"} if conv else set())


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("preset", ["attn-only", "full"])
def test_every_module_of_a_preset_loads_in_every_web_ui(kind, preset):
    net = NetworkConfig(rank=4, alpha=2.0, type=kind, preset=preset, train_text_encoder=True,
                        conv_rank=2 if preset == "full" else 0)
    c = injected(net)
    state = exported(c, net)
    modules = {f"unet.{n}" for n in networks.lora_module_names(c["unet"])} | {
        f"text_encoder.text_model.{n.removeprefix('text_model.')}" for n in networks.lora_module_names(c["text_encoder"])}
    assert len(modules) == {"attn-only": 128 + 48, "full": 281 + 72}[preset]  # the tiny UNet has one conv_shortcut less
    for loader in LOADERS:
        result = loaders.match(loader, state.keys(), loaders.tiny_model_names())
        assert result.ok and result.applied_modules == modules, (loader, result.reason, result.ignored_keys[:3])


@pytest.mark.parametrize("network, message", [
    ({"preset": "attn"}, "network.preset must be one of 'kohya' | 'attn-only' | 'attn-mlp' | 'full'"),
    ({"preset": "attn-only", "conv_rank": 4}, 'network.conv_rank trains the ResNet convs, which network.preset = '
                                              '"attn-only" leaves out'),
])
def test_preset_errors(tmp_path, network, message, capsys):
    config = write_config(tmp_path, tmp_path, tmp_path, network=network)
    assert main(["train", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- LyCORIS

@pytest.mark.parametrize("args, expected", [
    # LyCORIS's defaults: algo lora (locon), preset full with conv_dim = dim and conv_alpha = alpha
    ([], {"type": "lora", "preset": "full", "conv_rank": 8, "conv_alpha": 4.0, "train_text_encoder": True}),
    (["algo=loha", "preset=attn-mlp"], {"type": "loha", "preset": "attn-mlp", "conv_rank": 0}),
    (["algo=lokr", "factor=4", "conv_dim=2", "conv_alpha=1"],
     {"type": "lokr", "lokr_factor": 4, "preset": "full", "conv_rank": 2, "conv_alpha": 1.0}),
    (["algo=locon", "preset=full-lin"], {"type": "lora", "preset": "full", "conv_rank": 0}),
    (["preset=unet-only", "conv_dim=0"], {"preset": "full", "conv_rank": 8, "train_text_encoder": False}),
    (["preset=unet-transformer-only"], {"preset": "attn-mlp", "conv_rank": 0, "train_text_encoder": False}),
    (["algo=lokr", "preset=attn-only", "bypass_mode=True"], {"type": "lokr", "preset": "attn-only"}),
])
def test_lycoris_network_args_map_to_network_keys(kohya_dataset_config, capsys, args, expected):
    base = ["--pretrained_model_name_or_path=m", f"--dataset_config={kohya_dataset_config}", "--output_dir=o",
            "--seed=1",
            "--network_module=lycoris.kohya", "--network_dim=8", "--network_alpha=4"]
    network = print_config(capsys, *base, *(["--network_args", *args] if args else []))["network"]
    assert {k: network[k] for k in expected} == expected


def test_lycoris_args_give_the_same_adapter_as_our_keys(tmp_path, tiny_model_dir, kohya_dataset_config):
    args = documented_command(tiny_model_dir, kohya_dataset_config, tmp_path / "kohya") + [
        "--seed=2", "--max_train_epochs=2", "--network_module=lycoris.kohya", "--network_args", "algo=lokr",
        "preset=full", "factor=4", "conv_dim=4", "conv_alpha=2", "--network_train_unet_only"]
    assert main(["kohya", *args]) == 0
    ours = {
        "model": {"pretrained": str(tiny_model_dir)},
        "network": {"type": "lokr", "preset": "full", "rank": 16, "alpha": 1.0, "lokr_factor": 4, "conv_rank": 4,
                    "conv_alpha": 2.0, "train_text_encoder": False},
        "training": {"output_dir": str(tmp_path / "ours"), "output_name": "my_lora", "max_train_epochs": 2,
                     "save_every_n_epochs": 1, "mixed_precision": "fp16", "learning_rate": 1e-4,
                     "text_encoder_lr": 1e-4, "optimizer": "adamw8bit", "seed": 2, "save_precision": "fp32",
                     "save_state_every_steps": 0, "cache_latents": False, "log_with": "none"},
        "noise": {"offset": 0.0}}
    config = tmp_path / "ours.toml"
    config.write_text(toml.dumps(ours), encoding="utf-8")
    assert main(["train", "--config", str(config), "--dataset-config", str(kohya_dataset_config)]) == 0
    a, b = load_file(tmp_path / "kohya" / "my_lora.safetensors"), load_file(tmp_path / "ours" / "my_lora.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert any(k.startswith("lora_unet_conv_in.lokr_") for k in a)  # LyCORIS's full preset: conv_in too
    assert not any(k.startswith("lora_te_") for k in a)


def test_dora_and_other_unimplemented_lycoris_args_are_refused_with_the_reason(tmp_path, capsys):
    code = main(["kohya", "--pretrained_model_name_or_path=m", "--output_dir=o", f"--train_data_dir={tmp_path}",
                 "--network_module=lycoris.kohya", "--network_args", "algo=ia3", "dora_wd=True", "use_tucker=True",
                 "preset=my_preset.toml", "train_norm=false", "constraint=1"])
    assert code == 2
    err = capsys.readouterr().err
    for expected in ("algo=ia3: not implemented; lora-offset trains locon, loha and lokr",
                     "dora_wd=True: DoRA is not exported: PEFT keeps DoRA's magnitude per output channel while "
                     "AUTOMATIC1111 v1.10 applies dora_scale per input channel",
                     "use_tucker=True: not implemented", "preset=my_preset.toml: not implemented",
                     "constraint: an OFT option"):
        assert expected in err, expected
    assert "train_norm" not in err  # "false" is off
    assert main(["kohya", "--pretrained_model_name_or_path=m", "--output_dir=o", f"--train_data_dir={tmp_path}",
                 "--network_module=networks.lora_flux"]) == 2
    assert "--network_module=networks.lora_flux: a network of FLUX (flux_train_network.py)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- dropout

def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("shape", [(200, 7, 16), (200, 16, 3, 3), (200, 16)])  # tokens, a conv, time_emb_proj
def test_rank_dropout_zeroes_ranks_per_sample_within_binomial_bounds_and_rescales(shape):
    from lora_offset.training.network_regularizers import RankModuleDropout

    torch.manual_seed(0)
    p = 0.25
    hook = RankModuleDropout(rank_dropout=p, module_dropout=0.0)
    module = torch.nn.Linear(1, 1).train()
    out = hook(module, (), torch.ones(shape, dtype=torch.float64))
    rank_axis = 1 if len(shape) == 4 else -1
    per_rank = out.movedim(rank_axis, 1).reshape(shape[0], shape[rank_axis], -1)
    # one draw per (sample, rank), shared by every token / pixel
    assert (per_rank == per_rank[..., :1]).all()
    kept = per_rank[..., 0]
    assert set(kept.unique().tolist()) == {0.0, 1 / (1 - p)}
    assert within_binomial(int((kept == 0).sum()), kept.numel(), p)
    assert hook(module.eval(), (), torch.ones(shape)).equal(torch.ones(shape))  # off at eval


def test_module_dropout_leaves_whole_modules_out_within_binomial_bounds():
    from lora_offset.training.network_regularizers import RankModuleDropout

    torch.manual_seed(0)
    p, n = 0.3, 4000
    hook = RankModuleDropout(rank_dropout=0.0, module_dropout=p)
    module = torch.nn.Linear(1, 1).train()
    dropped = sum(int(hook(module, (), torch.ones(2, 4)).abs().sum() == 0) for _ in range(n))
    assert within_binomial(dropped, n, p)
    assert all(hook(module.eval(), (), torch.ones(2, 4)).equal(torch.ones(2, 4)) for _ in range(50))


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_module_dropout_on_the_tiny_unet_is_random_while_training_and_off_at_eval(kind):
    """A dropped module adds nothing: its output is the base layer's. LoRA: kohya's hook; LoHa / LoKr: PEFT's own."""
    from lora_offset.training.network_regularizers import add_rank_module_dropout

    net = NetworkConfig(rank=4, alpha=4.0, type=kind, module_dropout=0.5, rank_dropout=0.2)
    c = injected(net)
    if kind == "lora":
        assert add_rank_module_dropout(c["unet"], net.rank_dropout, net.module_dropout) == 192
    layer = c["unet"].get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    x = torch.randn(2, 5, layer.in_features)
    base = layer.base_layer(x)
    torch.manual_seed(3)
    c["unet"].train()
    outputs = [layer(x) for _ in range(400)]
    dropped = sum(int(o.equal(base)) for o in outputs)
    assert within_binomial(dropped, 400, 0.5)
    distinct = {round(float((o - base).abs().sum()), 4) for o in outputs if not o.equal(base)}
    assert len(distinct) > 10  # rank dropout: different deltas from pass to pass
    c["unet"].eval()
    full = layer(x)
    assert all(layer(x).equal(full) for _ in range(20)) and not full.equal(base)
    expected = base + (layer.get_delta_weight(networks.ADAPTER_NAME) @ x.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("network, message", [
    ({"rank_dropout": 1.0}, "network.rank_dropout must be in [0, 1), got 1.0"),
    ({"module_dropout": -0.1}, "network.module_dropout must be in [0, 1), got -0.1"),
])
def test_dropout_range_errors_name_the_key(tmp_path, network, message, capsys):
    config = write_config(tmp_path, tmp_path, tmp_path, network=network)
    assert main(["train", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_kohya_rank_and_module_dropout_train_and_are_recorded(tmp_path, tiny_model_dir, kohya_dataset_config, capsys):
    args = documented_command(tiny_model_dir, kohya_dataset_config, tmp_path / "out") + [
        "--seed=0", "--max_train_steps=2", "--max_train_epochs=1", "--network_args", "rank_dropout=0.1",
        "module_dropout=0.2", "conv_dim=2"]
    network = print_config(capsys, *args)["network"]
    assert (network["rank_dropout"], network["module_dropout"], network["conv_rank"]) == (0.1, 0.2, 2)
    assert main(["kohya", *args]) == 0
    with safe_open(str(tmp_path / "out" / "my_lora.safetensors"), "pt") as f:
        recorded = f.metadata()["ss_network_args"]
    assert json.loads(recorded) == {"conv_dim": "2", "conv_alpha": "1.0", "rank_dropout": "0.1",
                                    "module_dropout": "0.2"}


# --------------------------------------------------------------------------------------------------- blocks

def ldm_block(ldm_path: str) -> int | None:
    """The block a module's original (LDM) UNet path puts it in: input_blocks.N -> N, middle_block -> 12,
    output_blocks.N -> 13 + N (what kohya's block numbering stands for)."""
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", ldm_path)
    if m is None:
        return None
    return {"input_blocks": int(m.group(2)), "middle_block": 12, "output_blocks": 13 + int(m.group(2))}[m.group(1)]


def test_kohyas_block_numbering_is_the_ldm_unet_layout_on_every_sd15_module():
    """Checked against diffusers' own single-file converter's map (lora_offset.formats.loaders), not itself."""
    names = loaders.sd15_model_names()
    assert len(names.unet_ldm) == 391  # every SD 1.5 UNet module with a weight
    for path, ldm in names.unet_ldm.items():
        assert network_targets.block_index(path) == ldm_block(ldm), (path, ldm)
        for kind in ("linear", "conv"):
            inside = [b for b in range(25) if (p := network_targets.block_pattern(b, kind)) and re.fullmatch(p, path)]
            assert len(inside) <= 1 and all(b == ldm_block(ldm) for b in inside), (path, kind, inside)


def test_lr_weight_curves_are_kohyas():
    cosine, sine = network_targets.lr_curve("cosine"), network_targets.lr_curve("sine+0.5")
    assert (cosine[0], cosine[-1], sine[0], sine[-1]) == (1.0, 0.0, 0.5, 1.5)
    assert all(a > b for a, b in zip(cosine, cosine[1:])) and all(a < b for a, b in zip(sine, sine[1:]))
    assert network_targets.lr_curve("linear") == [i / 11 for i in range(12)]
    assert network_targets.lr_curve("reverse_linear") == [i / 11 for i in reversed(range(12))]
    assert network_targets.lr_curve("zeros+0.25") == [0.25] * 12
    net = NetworkConfig(down_lr_weight=[0.0, 0.5] + [1.0] * 10, up_lr_weight="zeros", block_lr_zero_threshold=0.5)
    # given weights at or below the threshold become 0; the unset middle block stays 1
    assert network_targets.block_lr_weights(net) == [0.0, 0.0] + [1.0] * 10 + [1.0] + [0.0] * 12
    assert network_targets.block_lr_weights(NetworkConfig()) is None


BLOCK_DIMS = [0, 2, 3, 1, 4, 0, 1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
BLOCK_ALPHAS = [1.0 + b / 4 for b in range(25)]


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_block_dims_give_each_block_its_rank_and_alpha_and_load_in_every_web_ui(kind):
    net = NetworkConfig(type=kind, rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.0, block_dims=BLOCK_DIMS,
                        block_alphas=BLOCK_ALPHAS, conv_block_dims=[2] * 24 + [0], conv_block_alphas=[0.5] * 25)
    c = injected(net)
    by_block: dict[tuple, set] = {}
    for name in networks.lora_module_names(c["unet"]):
        layer = c["unet"].get_submodule(name)
        rank = layer.r[networks.ADAPTER_NAME]
        conv = re.fullmatch(network_targets.UNET_CONV_3X3_TARGETS, name) is not None
        by_block.setdefault((network_targets.block_index(name), conv), set()).add(rank)
    for block in range(1, 25):  # block 0 is conv_in, which preset "kohya" does not train
        linear = network_targets.block_pattern(block, "linear") is not None
        assert by_block.get((block, False)) == ({BLOCK_DIMS[block]} if linear and BLOCK_DIMS[block] else None), block
        assert by_block.get((block, True)) == ({2} if block < 24 else None), block
    assert (0, False) not in by_block and (None, False) not in by_block
    state = exported(c, net)
    for loader in LOADERS:
        result = loaders.match(loader, state.keys(), loaders.tiny_model_names())
        assert result.ok and len(result.applied_modules) == len(networks.lora_module_names(c["unet"])), loader
    # modules of different ranks and alphas in one file: every web UI applies each module's own delta
    from tests.test_lycoris import module_tensors, peft_layers

    for key, layer in peft_layers(c).items():
        expected = layer.get_delta_weight(networks.ADAPTER_NAME).detach().double()
        shape = tuple(layer.get_base_layer().weight.shape)
        for delta in (loaders.a1111_weight_delta(module_tensors(state, key), shape),
                      loaders.comfyui_weight_delta(module_tensors(state, key), shape)):
            torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_a_zero_lr_weight_trains_no_module_in_its_block_and_groups_get_kohyas_lr(tmp_path, tiny_model_dir, images):
    from lora_offset.training import optimizers

    down = [0.0, 0.0, 0.5, 1.0, 0.0, 2.0, 1.0, 1.0, 1.0, 0.25, 1.0, 1.0]
    net = NetworkConfig(rank=4, alpha=4.0, conv_rank=2, down_lr_weight=down, mid_lr_weight=0.0, up_lr_weight="linear")
    weights = network_targets.block_lr_weights(net)
    c = injected(net)
    params = {n: p for n, p in c["unet"].named_parameters() if networks.is_adapter_parameter(n)}
    blocks = {network_targets.block_index(n) for n in params}
    assert blocks == {b for b in range(1, 25) if weights[b] > 0 and b != 13}  # up 0 has weight 0 ("linear")
    groups = optimizers.param_groups("adamw", params, {}, 1e-3, None, None, weights)
    names = {id(p): n for n, p in params.items()}
    for group in groups:
        (block,) = {network_targets.block_index(names[id(p)]) for p in group["params"]}
        assert group["lr"] == pytest.approx(1e-3 * weights[block])  # kohya: unet_lr x the block's weight
    assert sum(len(g["params"]) for g in groups) == len(params)
    with pytest.raises(Exception, match="need a learning rate per block"):
        optimizers.param_groups("prodigy", params, {}, 1.0, None, None, weights)
    # Trained through the command line: the file has no module in a zero-weight block.
    config = write_config(tmp_path, tiny_model_dir, images, network={
        "rank": 4, "alpha": 4.0, "down_lr_weight": down, "mid_lr_weight": 0.0, "up_lr_weight": "linear"},
        training={"max_steps": 2, "optimizer": "adamw"})
    assert main(["train", "--config", str(config)]) == 0
    modules = {k.split(".")[0] for k in load_file(tmp_path / "out" / "tiny.safetensors")}
    paths = loaders.tiny_model_names().flat_index  # kohya module key -> (component, module path, naming)
    file_blocks = {network_targets.block_index(paths[m][1]) for m in modules}
    attention_blocks = {1, 2, 4, 5, 7, 8, 12, *range(16, 25)}  # no conv_rank: the transformers' modules alone
    assert file_blocks == {b for b in attention_blocks if weights[b] > 0} == {2, 5, 7, 8, *range(16, 25)}


@pytest.mark.parametrize("network, message", [
    ({"down_lr_weight": [1.0] * 11}, "network.down_lr_weight must have 12 weights (input_blocks 0-11), got 11"),
    ({"up_lr_weight": "cos"}, "network.up_lr_weight = 'cos': unknown lr weight curve 'cos'"),
    ({"block_dims": [4] * 24}, "network.block_dims must have 25 values"),
    ({"block_dims": [4] * 24 + [-1]}, "network.block_dims must be ranks >= 0"),
    ({"block_alphas": [0.0] * 25}, "network.block_alphas must be alphas > 0"),
    ({"conv_block_dims": [2] * 25, "preset": "attn-mlp"}, "network.conv_block_dims trains the ResNet convs"),
    ({"block_dims": [4] * 25, "dim_from_weights": True, "weights": "x"}, "network.dim_from_weights takes every"),
])
def test_block_key_errors_name_the_key(tmp_path, network, message, capsys):
    config = write_config(tmp_path, tmp_path, tmp_path, network=network)
    assert main(["train", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_kohya_block_network_args_map_as_kohya_reads_them(kohya_dataset_config, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lora_offset")
    base = ["--pretrained_model_name_or_path=m", f"--dataset_config={kohya_dataset_config}", "--output_dir=o",
            "--seed=1", "--network_dim=8", "--network_alpha=4", "--network_args"]
    dims = ",".join(str(d) for d in BLOCK_DIMS)
    n = print_config(capsys, *base, "down_lr_weight=0,,0.5", "mid_lr_weight=0.5", "up_lr_weight=sine+0.1",
                     "block_lr_zero_threshold=0.1", f"block_dims={dims}", "conv_block_dims=" + ",".join(["2"] * 25),
                     "conv_block_alphas=" + ",".join(["1"] * 25))["network"]
    assert n["down_lr_weight"] == [0.0, 0.0, 0.5] + [1.0] * 9  # kohya: an empty entry is 0, a short list ends in 1s
    assert (n["mid_lr_weight"], n["up_lr_weight"], n["block_lr_zero_threshold"]) == (0.5, "sine+0.1", 0.1)
    assert (n["block_dims"], n["conv_block_dims"], n["conv_block_alphas"]) == (BLOCK_DIMS, [2] * 25, [1.0] * 25)
    # without block_dims or an lr weight kohya ignores the per-block alphas and conv dims
    n = print_config(capsys, *base, "block_alphas=" + ",".join(["2"] * 25), "conv_dim=4",
                     "conv_block_dims=" + ",".join(["2"] * 25))["network"]
    assert "block_alphas" not in n and "conv_block_dims" not in n and n["conv_rank"] == 4
    assert any("conv_block_dims: kohya reads it only with block_dims or an lr weight" in m for m in caplog.messages)


# --------------------------------------------------------------------------------------------------- max-norm

def delta_norms(c: dict) -> dict[str, float]:
    return {id(layer): float(layer.get_delta_weight(networks.ADAPTER_NAME).norm())
            for model in (c["unet"], c["text_encoder"]) for layer in adapter_layers(model)}


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_max_norm_scales_every_delta_above_the_bound_down_to_it_and_leaves_the_others(kind):
    net = NetworkConfig(type=kind, rank=4, alpha=4.0, conv_rank=2, conv_alpha=2.0, train_text_encoder=True)
    c = injected(net)
    before = delta_norms(c)
    bound = sorted(before.values())[len(before) // 2]  # about half the modules are above it
    params_before = {id(p): p.detach().clone() for m in (c["unet"], c["text_encoder"]) for p in m.parameters()
                     if p.requires_grad}
    stats = scale_weight_norms([c["unet"], c["text_encoder"]], bound)
    after = delta_norms(c)
    above = {k for k, n in before.items() if n > bound}
    assert stats.keys_scaled == len(above) > 0
    assert all(after[k] <= bound * (1 + 1e-5) for k in after)  # no delta norm above the bound
    assert all(after[k] == pytest.approx(bound, rel=1e-5) for k in above)
    assert stats.max_key_norm == pytest.approx(bound) and stats.average_key_norm <= bound
    for model in (c["unet"], c["text_encoder"]):
        for layer in adapter_layers(model):
            if id(layer) not in above:  # untouched, bit for bit
                assert all(p.equal(params_before[id(p)]) for p in factors(layer))
            elif kind == "lora":  # kohya: up and down each by sqrt(ratio)
                ratio = bound / before[id(layer)]
                for p in factors(layer):
                    torch.testing.assert_close(p, params_before[id(p)] * ratio ** 0.5)


def test_scale_weight_norms_bounds_every_module_of_the_trained_file(tmp_path, tiny_model_dir, kohya_dataset_config):
    from lora_offset.tiny import build_tiny_components
    from tests.test_lycoris import module_tensors
    from tests.test_train_kohya_datasets import scalars

    out = tmp_path / "out"
    args = documented_command(tiny_model_dir, kohya_dataset_config, out) + [
        "--seed=0", "--max_train_epochs=3", "--learning_rate=3e-2", "--optimizer_type=AdamW", "--network_dim=4",
        "--scale_weight_norms=0.05", f"--logging_dir={tmp_path / 'logs'}"]
    assert main(["kohya", *args]) == 0
    state = load_file(out / "my_lora.safetensors")
    paths = loaders.tiny_model_names().flat_index
    c = build_tiny_components(seed=0)
    norms = []
    for key in {k.split(".")[0] for k in state}:
        component, path, _ = paths[key]
        shape = tuple(c[component].get_submodule(path.removeprefix("text_model.") if component == "text_encoder"
                                                  else path).weight.shape)
        norms.append(float(loaders.a1111_weight_delta(module_tensors(state, key), shape).norm()))
    assert len(norms) == 192 + 72 and max(norms) <= 0.05 * (1 + 1e-3)  # fp32 file, the loader's own delta
    scaled = scalars(tmp_path / "logs", "max_norm/keys_scaled")
    assert sorted(scaled) == [1, 2, 3] and max(scaled.values()) > 0  # logged every step, as kohya does
    assert metadata_of(out / "my_lora.safetensors")["ss_scale_weight_norms"] == "0.05"


def metadata_of(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_scale_weight_norms_must_be_positive(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path, tmp_path, network={"scale_weight_norms": 0.0})
    assert main(["train", "--config", str(config)]) == 2
    assert "network.scale_weight_norms must be > 0 (kohya suggests 1), got 0.0" in capsys.readouterr().err
