"""LoHa and LoKr (network.type): trained through PEFT, exported in LyCORIS's kohya-named format at the
scale every loader applies, read by inspect / convert / merge, refused by resize."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lora_offset.cli import main
from lora_offset.formats import loaders
from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name
from lora_offset.formats.lycoris import lycoris_state_dict
from lora_offset.formats.reader import read_adapter
from lora_offset.training import networks
from tests.test_train import make_images, write_config

# (network type, rank): LoKr at rank 2 stores w2 as a low-rank product on the tiny widths (scale
# alpha / r in every loader); at rank 16 both Kronecker factors are whole (scale 1.0 in every loader).
CASES = [("loha", 2), ("lokr", 2), ("lokr", 16)]
MODULES = 349  # tiny model: 192 attention + 85 conv-LoRA UNet modules + 72 text-encoder modules


def adapted(kind: str, rank: int, seed: int = 0) -> dict:
    """Tiny components with a PEFT LoHa / LoKr on every kohya target (conv and text encoder too), all
    factors random (PEFT zero-initializes one), alpha != rank."""
    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    networks.add_lora(c["unet"], networks.unet_network_config(kind, rank, 3.0, conv_rank=rank, conv_alpha=1.5))
    networks.add_lora(c["text_encoder"], networks.text_encoder_network_config(kind, rank, 3.0))
    g = torch.Generator().manual_seed(seed + 1)
    for model in (c["unet"], c["text_encoder"]):
        for name, p in model.named_parameters():
            if networks.is_adapter_parameter(name):
                p.data = 0.2 * torch.randn(p.shape, generator=g)
        model.eval()
    return c


def peft_layers(c) -> dict[str, torch.nn.Module]:
    """{kohya module key: PEFT LoHa / LoKr layer}."""
    out = {}
    for prefix, model in ((UNET_PREFIX, c["unet"]), (TEXT_ENCODER_PREFIX, c["text_encoder"])):
        for name in networks.lora_module_names(model):
            out[kohya_name(prefix, name)] = model.get_submodule(name)
    return out


def module_tensors(state: dict, key: str) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == key}


def outputs(unet, text_encoder):
    g = torch.Generator().manual_seed(0)
    ids, latents = torch.randint(0, 500, (2, 77), generator=g), torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        return hidden, unet(latents, torch.tensor([10, 700]), encoder_hidden_states=hidden).sample


def hand_merged(path) -> tuple:
    """Fresh tiny models with every module of the file added to its weight (reader's delta)."""
    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    with torch.no_grad():
        for m in read_adapter(path, "test").modules.values():
            model = c["unet"] if m.component == "unet" else c["text_encoder"]
            path_in_model = m.path if m.component == "unet" else m.path.removeprefix("text_model.")
            weight = model.get_submodule(path_in_model).weight
            weight += m.delta().reshape(weight.shape)
    return c["unet"].eval(), c["text_encoder"].eval()


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-r{r}" for k, r in CASES])
def exported(request, tmp_path_factory):
    from lora_offset.formats.kohya import save_lora

    kind, rank = request.param
    c = adapted(kind, rank)
    path = save_lora(tmp_path_factory.mktemp(kind) / f"{kind}.safetensors", lycoris_state_dict(c["unet"], c["text_encoder"]),
                     {"ss_network_module": "lycoris.kohya"}, precision="fp32")
    return kind, rank, c, path


def test_keys_are_lycoris_kohya_names(exported):
    kind, rank, c, path = exported
    state = safetensors.torch.load_file(str(path))
    modules = {k.split(".", 1)[0] for k in state}
    assert modules == set(peft_layers(c)) and len(modules) == MODULES
    suffixes = {frozenset(module_tensors(state, m)) for m in modules}
    if kind == "loha":
        assert suffixes == {frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"})}
        assert state[f"{next(iter(modules))}.hada_w1_b"].dim() == 2  # flattened conv factors, as LyCORIS stores them
    elif rank == 2:
        assert frozenset({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}) in suffixes
    else:
        assert suffixes == {frozenset({"lokr_w1", "lokr_w2", "alpha"})}


def test_every_loader_oracle_applies_the_peft_delta_to_every_module(exported):
    kind, rank, c, path = exported
    state = safetensors.torch.load_file(str(path))
    read = {m.kohya_key: m for m in read_adapter(path, "test").modules.values()}
    for key, layer in peft_layers(c).items():
        expected = layer.get_delta_weight(networks.ADAPTER_NAME).detach().double()
        shape = tuple(layer.get_base_layer().weight.shape)
        tensors = module_tensors(state, key)
        size = float(expected.abs().max())
        for name, delta in (("a1111", loaders.a1111_weight_delta(tensors, shape)),
                            ("comfyui/forge", loaders.comfyui_weight_delta(tensors, shape)),
                            ("reader", read[key].weight_delta())):
            assert delta is not None and tuple(delta.shape) == shape, (name, key)
            torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-6 * size, msg=f"{name} {key}")
    keys = list(state)
    for loader in ("a1111", "forge", "comfyui"):
        result = loaders.match(loader, keys, loaders.tiny_model_names())
        assert result.ok and len(result.applied_modules) == MODULES, (loader, result.reason)
    assert loaders.match_diffusers(keys, loaders.tiny_model_names()).whole_lora_rejected  # diffusers has no LyCORIS


def test_hand_merge_and_lora_offset_merge_equal_the_peft_forward(exported, tiny_model_dir, tmp_path):
    from lora_offset.tools.merge import merge_checkpoint

    kind, rank, c, path = exported
    truth = outputs(c["unet"], c["text_encoder"])
    base = outputs(*hand_merged_base())
    for got in (outputs(*hand_merged(path)), merged_outputs(tiny_model_dir, path, tmp_path, merge_checkpoint)):
        for g, t, b in zip(got, truth, base):
            assert (t - b).abs().max() > 100 * (g - t).abs().max()  # the adapter matters, and is reproduced
            torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-4 * float(t.abs().max()))


def hand_merged_base():
    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    return c["unet"].eval(), c["text_encoder"].eval()


def merged_outputs(tiny_model_dir, path, tmp_path, merge_checkpoint):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    merge_checkpoint(tiny_model_dir, [(path, 1.0)], tmp_path / "merged")
    return outputs(UNet2DConditionModel.from_pretrained(tmp_path / "merged", subfolder="unet").eval(),
                   CLIPTextModel.from_pretrained(tmp_path / "merged", subfolder="text_encoder").eval())


def test_inspect_reports_the_modules(exported, capsys):
    kind, rank, _, path = exported
    assert main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kinds"] == {kind: MODULES} and s["modules"]["total"] == MODULES and s["unrecognized_keys"] == []
    if kind == "lokr" and rank == 16:
        assert s["ranks"] == {"full": MODULES} and s["scales"] == {"1 (LoKr, no low-rank factor)": MODULES}
    else:
        assert s["ranks"] == {str(rank): MODULES} and set(s["scales"]) == {"1.5", "0.75"}  # alpha 3 / 2, conv 1.5 / 2
    for loader in ("a1111", "forge", "comfyui"):
        assert s["loaders"][loader]["ok"], loader
    assert main(["inspect", str(path)]) == 0
    assert f"type        {dict(loha='LoHa', lokr='LoKr')[kind]} ({MODULES})" in capsys.readouterr().out


def test_convert_passes_them_through(exported, tmp_path):
    kind, rank, _, path = exported
    state = safetensors.torch.load_file(str(path))
    odd = tmp_path / "te1.safetensors"  # the text encoder spelt lora_te1_: renamed, values untouched
    safetensors.torch.save_file({k.replace("lora_te_", "lora_te1_"): v for k, v in state.items()}, str(odd))
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(odd), str(out)]) == 0
    converted = safetensors.torch.load_file(str(out))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)
    assert safetensors.safe_open(str(out), "pt").metadata()["ss_network_module"] == "lycoris.kohya"


def test_resize_refuses_and_merge_needs_a_rank(exported, tmp_path, capsys):
    kind, _, c, path = exported
    assert main(["resize", str(path), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resize: ") and f"are {kind}" in err and "merge --lora IN --out OUT --rank R" in err
    assert main(["merge", "--lora", str(path), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "pass --rank R to merge by SVD" in capsys.readouterr().err
    # With --rank: a plain LoRA, each module the SVD optimum of the LyCORIS delta.
    out = tmp_path / "as-lora.safetensors"
    assert main(["merge", "--lora", str(path), "--out", str(out), "--rank", "4", "--precision", "fp32"]) == 0
    lora = {m.kohya_key: m for m in read_adapter(out, "test").modules.values()}
    for key, layer in peft_layers(c).items():
        delta = layer.get_delta_weight(networks.ADAPTER_NAME).detach().double().reshape(lora[key].up.shape[0], -1)
        s = torch.linalg.svdvals(delta)
        error = float((lora[key].weight_delta().double().reshape(delta.shape) - delta).norm())
        assert abs(error - float(s[4:].pow(2).sum().sqrt())) <= 1e-5 * float(delta.norm()), key


@pytest.mark.parametrize("kind, extra", [("loha", {"loha_rank": 2}), ("lokr", {"lokr_factor": 4})])
def test_train_cli_exports_a_file_equal_to_the_trained_peft_model(tmp_path, tiny_model_dir, kind, extra):
    """Train through the CLI; the saved state holds the PEFT weights: PEFT's forward with them equals a
    hand merge of the exported file."""
    images = make_images(tmp_path / "data" / "10_sks dog", 2)
    network = {"type": kind, "rank": 4, "alpha": 2.0, "train_text_encoder": True, "conv_rank": 2, "conv_alpha": 1.0, **extra}
    config = write_config(tmp_path, tiny_model_dir, images, network=network,
                          training={"max_steps": 3, "save_every_steps": 2, "save_state_every_steps": 2})
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "out" / "tiny-step000002.safetensors"  # the adapter at the step of the saved state
    meta = safetensors.safe_open(str(out), "pt").metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == kind
    state = torch.load(tmp_path / "out" / "state" / "state-00000002.pt", weights_only=True)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from lora_offset.config import NetworkConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    unet_config, te_config = networks.network_configs(NetworkConfig(**network))
    for model, config, key in ((unet, unet_config, "unet_lora"), (text_encoder, te_config, "text_encoder_lora")):
        networks.add_lora(model, config)
        assert set(state[key]) == {n for n, _ in model.named_parameters() if networks.is_adapter_parameter(n)}
        model.load_state_dict(state[key], strict=False)
    truth = outputs(unet.eval(), text_encoder.eval())
    for got, expected, before in zip(outputs(*hand_merged(out)), truth, outputs(*hand_merged_base())):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert (expected - before).abs().max() > 0  # training moved it


@pytest.mark.parametrize("network, message", [
    ({"type": "lycoris"}, "network.type must be one of"),
    ({"loha_rank": 4}, "network.loha_rank is the rank of a LoHa"),
    ({"type": "loha", "loha_rank": 0}, "network.loha_rank must be >= 1"),
    ({"type": "lokr", "lokr_factor": 0}, "network.lokr_factor must be -1"),
    ({"type": "loha", "lokr_factor": 4}, "network.lokr_factor shapes a LoKr"),
    ({"type": "lokr", "dropout": 0.1}, "network.dropout is LoRA's dropout"),
])
def test_network_type_config_errors(tmp_path, network, message, capsys):
    config = write_config(tmp_path, tmp_path, tmp_path, network=network)
    assert main(["train", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_nf4_base_is_refused_for_loha_and_lokr(tmp_path, capsys):
    """PEFT's LoHa / LoKr reshape their delta to the base layer's weight, which bitsandbytes packs (crashes)."""
    config = write_config(tmp_path, tmp_path, tmp_path, network={"type": "lokr"}, model={"base_precision": "nf4"})
    assert main(["train", "--config", str(config)]) == 2
    assert 'use base_precision "fp8"' in capsys.readouterr().err


def test_bf16_alpha_rounding_is_taken_out_of_the_loha_factor(tmp_path):
    """bf16 stores alpha 0.3 as 0.30078: as for LoRA's lora_up, hada_w1_a takes the 0.26 % back."""
    from lora_offset.formats.kohya import save_lora

    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    g = torch.Generator().manual_seed(0)
    state = {f"{key}.{n}": torch.randn(*s, generator=g) for n, s in
             (("hada_w1_a", (256, 4)), ("hada_w1_b", (4, 64)), ("hada_w2_a", (256, 4)), ("hada_w2_b", (4, 64)))}
    state[f"{key}.alpha"] = torch.tensor(0.3)
    loaded = safetensors.torch.load_file(str(save_lora(tmp_path / "a.safetensors", state, {}, precision="bf16")))
    assert loaded[f"{key}.alpha"].item() == pytest.approx(0.30078125)
    exact = 0.3 * state[f"{key}.hada_w1_a"].double()
    stored = loaded[f"{key}.alpha"].double().item() * loaded[f"{key}.hada_w1_a"].double()
    systematic = (stored * exact).sum() / (exact * exact).sum()  # the common scale factor of the module
    assert abs(systematic.item() - 1) < 5e-4


def test_diffusers_refuses_lycoris_files_as_its_oracle_says(exported, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    _, _, _, path = exported
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(ValueError, match="correctly renamed"):
        pipe.load_lora_weights(str(path))
