"""`lora-offset convert`: diffusers / PEFT SD 1.x LoRA -> kohya, keeping every module's real scale."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lora_offset.formats import loaders
from lora_offset.cli import main
from lora_offset.tools.convert import convert_file


def load_pipe(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder hidden states, UNet noise prediction) for fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        noise = pipe.unet(latents, 500, encoder_hidden_states=hidden).sample
    return hidden, noise


def trained_pipe(model_dir, unet_config, te_config):
    """The tiny pipeline with PEFT adapters as diffusers' training scripts make them, lora_B non-zero."""
    pipe = load_pipe(model_dir)
    pipe.unet.add_adapter(unet_config)
    if te_config is not None:
        pipe.text_encoder.add_adapter(te_config)
    torch.manual_seed(1)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.2)
    return pipe


def save_diffusers_lora(pipe, folder, unet_config=None, te_config=None):
    """What diffusers' training scripts write: StableDiffusionPipeline.save_lora_weights (+ adapter metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    if unet_config is not None:
        kwargs["unet_lora_adapter_metadata"] = unet_config.to_dict()
    if te_config is not None:
        kwargs["text_encoder_lora_adapter_metadata"] = te_config.to_dict()
    te_layers = get_peft_model_state_dict(pipe.text_encoder) if getattr(pipe.text_encoder, "peft_config", None) else None
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=te_layers, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def loaded_outputs(model_dir, lora_file):
    pipe = load_pipe(model_dir)
    pipe.load_lora_weights(str(lora_file))
    return outputs(pipe)


def configs():
    from peft import LoraConfig

    # alpha != r, and a rank/alpha pattern, as in the diffusers training scripts' configs.
    unet = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"],
                      rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn2.to_k": 1, "proj_in": 3})
    te = LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj", "out_proj", "fc1"])
    return unet, te


def test_diffusers_file_with_adapter_metadata_converts_to_same_outputs(tiny_model_dir, tmp_path):
    unet_cfg, te_cfg = configs()
    pipe = trained_pipe(tiny_model_dir, unet_cfg, te_cfg)
    truth = outputs(pipe)
    original = save_diffusers_lora(pipe, tmp_path / "diffusers", unet_cfg, te_cfg)
    converted = tmp_path / "kohya.safetensors"
    summary = convert_file(original, converted)
    assert summary["scale_from"] == {"adapter config": summary["modules"]}
    assert summary["folded_into_lora_up"] > 0  # three different scales: 2.0, 0.5 (attn2.to_k), 0.75 (proj_in) ...
    base = outputs(load_pipe(tiny_model_dir))

    via_original = loaded_outputs(tiny_model_dir, original)
    via_converted = loaded_outputs(tiny_model_dir, converted)
    for t, o, c, b in zip(truth, via_original, via_converted, base):
        assert not torch.allclose(c, b, atol=1e-3)  # the LoRA does something
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-5)  # diffusers honours its metadata
        torch.testing.assert_close(c, o, rtol=1e-4, atol=1e-5)

    # The converted file is plain kohya with one alpha: every loader applies all of it.
    tensors = safetensors.torch.load_file(str(converted))
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8.0}
    for name, result in loaders.match_all(tensors.keys(), loaders.sd15_model_names()).items():
        assert result.ok, (name, result.reason)


def test_diffusers_file_without_metadata_means_scale_one(tiny_model_dir, tmp_path):
    unet_cfg, _ = configs()
    pipe = trained_pipe(tiny_model_dir, unet_cfg, None)
    original = save_diffusers_lora(pipe, tmp_path / "plain")  # no adapter metadata: diffusers uses alpha = r
    converted = tmp_path / "kohya.safetensors"
    summary = convert_file(original, converted)
    assert summary["scale_from"] == {"none: scale 1.0": summary["modules"]}
    tensors = safetensors.torch.load_file(str(converted))
    for key, value in tensors.items():
        if key.endswith(".alpha"):  # alpha == rank (4; attn2.to_k rank 2 folded into lora_up)
            assert float(value) == 4.0
    for o, c in zip(loaded_outputs(tiny_model_dir, original), loaded_outputs(tiny_model_dir, converted)):
        torch.testing.assert_close(c, o, rtol=1e-4, atol=1e-5)


def test_peft_adapter_folder(tiny_model_dir, tmp_path, capsys):
    from peft.utils import get_peft_model_state_dict

    unet_cfg, _ = configs()
    pipe = trained_pipe(tiny_model_dir, unet_cfg, None)
    folder = tmp_path / "peft"
    folder.mkdir()
    state = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    safetensors.torch.save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(unet_cfg.to_dict(), default=list))
    out = tmp_path / "from_peft.safetensors"
    assert main(["convert", str(folder), str(out)]) == 0
    assert "scale from adapter config" in capsys.readouterr().out
    truth = outputs(pipe)
    for t, c in zip(truth, loaded_outputs(tiny_model_dir, out)):
        torch.testing.assert_close(c, t, rtol=1e-4, atol=1e-5)
    meta = json.loads(json.dumps(safetensors.safe_open(str(out), "pt").metadata()))
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert "sshs_model_hash" in meta and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_mixed_spellings_are_renamed_and_kohya_alphas_kept(tmp_path):
    names = loaders.sd15_model_names()
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {
        # dotted diffusers key, no metadata: scale 1.0
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 320, 1, 1),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(320, 2, 1, 1),
        # LDM-style kohya key with alpha 1 at rank 2: scale 0.5
        "lora_unet_input_blocks_1_1_proj_out.lora_down.weight": torch.ones(2, 320, 1, 1),
        "lora_unet_input_blocks_1_1_proj_out.lora_up.weight": torch.ones(320, 2, 1, 1),
        "lora_unet_input_blocks_1_1_proj_out.alpha": torch.tensor(1.0),
        # lora_te1_ text encoder key without alpha: scale 1.0
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 2),
    }
    src = tmp_path / "mixed.safetensors"
    safetensors.torch.save_file(tensors, str(src), metadata={"ss_steps": "700", "ss_output_name": "mixed",
                                                             "sshs_model_hash": "stale"})
    dst = tmp_path / "out.safetensors"
    summary = convert_file(src, dst, precision="fp32")
    out = safetensors.torch.load_file(str(dst))
    meta = safetensors.safe_open(str(dst), "pt").metadata()  # the training record is kept, the hashes are new
    assert meta["ss_steps"] == "700" and meta["ss_output_name"] == "out" and meta["sshs_model_hash"] != "stale"
    assert set(out) == {f"{m}.{s}" for m in ("lora_unet_down_blocks_0_attentions_0_proj_in",
                                              "lora_unet_down_blocks_0_attentions_0_proj_out",
                                              "lora_te_" + q.replace(".", "_"))
                        for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert summary["network_alpha"] == 2.0  # scale 1.0 at rank 2 is the most common
    assert torch.equal(out["lora_unet_down_blocks_0_attentions_0_proj_out.lora_up.weight"], torch.full((320, 2, 1, 1), 0.5))
    assert torch.equal(out["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"], torch.ones(320, 2, 1, 1))
    verdicts = loaders.match_all(out.keys(), names)
    assert all(verdicts[name].ok for name in ("a1111", "forge", "comfyui", "invokeai"))
    # diffusers' quirk (see loaders.match_diffusers): a text-encoder q_proj LoRA without out_proj.
    assert verdicts["diffusers"].whole_lora_rejected


@pytest.mark.parametrize("bad_key, message", [
    ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
    ("unet.not_a_module.lora_A.weight", "names no SD 1.x"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "is a LoHa module without hada_w1_b, hada_w2_a, hada_w2_b"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_mid.weight", "is not a LoRA, LoHa or LoKr weight"),
    ("lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_a", "mixes LoRA, LoHa or LoKr weights"),
])
def test_unconvertible_keys_are_user_errors(tmp_path, capsys, bad_key, message):
    tensors = {"unet.down_blocks.0.attentions.0.proj_out.lora_A.weight": torch.ones(2, 320, 1, 1),
               "unet.down_blocks.0.attentions.0.proj_out.lora_B.weight": torch.ones(320, 2, 1, 1),
               bad_key: torch.ones(2)}
    src = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(src))
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: convert: ") and message in err and str(src) in err
    assert not dst.exists()


def test_missing_input_and_bad_output(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    src = tmp_path / "one.safetensors"
    safetensors.torch.save_file({"unet.down_blocks.0.attentions.0.proj_out.lora_A.weight": torch.ones(2, 320, 1, 1),
                                 "unet.down_blocks.0.attentions.0.proj_out.lora_B.weight": torch.ones(320, 2, 1, 1)},
                                str(src))
    assert main(["convert", str(src), str(src)]) == 2
    assert "is the input file" in capsys.readouterr().err


def test_lora_bias_is_refused(tmp_path, capsys):
    tensors = {"unet.down_blocks.0.attentions.0.proj_out.lora_A.weight": torch.ones(2, 320, 1, 1),
               "unet.down_blocks.0.attentions.0.proj_out.lora_B.weight": torch.ones(320, 2, 1, 1),
               "unet.down_blocks.0.attentions.0.proj_out.lora_B.bias": torch.ones(320)}
    src = tmp_path / "bias.safetensors"
    safetensors.torch.save_file(tensors, str(src))
    assert main(["convert", str(src), str(tmp_path / "o.safetensors")]) == 2
    assert "LoRA bias" in capsys.readouterr().err
