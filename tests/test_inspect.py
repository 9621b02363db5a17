"""`lora-offset inspect`: metadata, module counts, ranks/alphas, hashes and per-loader verdicts."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lora_offset.cli import main
from lora_offset.formats.keys import normalize_text_encoder_name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An SD 1.x LoRA of the tiny model written by our exporter (UNet + text encoder + conv)."""
    from lora_offset.formats.kohya import kohya_state_dict, save_lora
    from lora_offset.training.networks import add_lora, text_encoder_lora_config, unet_lora_config
    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    add_lora(c["unet"], unet_lora_config(4, 2.0, conv_rank=2, conv_alpha=1.0))
    add_lora(c["text_encoder"], text_encoder_lora_config(4, 2.0))
    sd = kohya_state_dict(c["unet"], c["text_encoder"])
    folder = tmp_path_factory.mktemp("inspect")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
            "ss_output_name": "tiny", "modelspec.architecture": "stable-diffusion-v1/lora"}
    path = save_lora(folder / "tiny.safetensors", sd, meta, precision="fp16")
    return path, sd, c


def inspect_json(capsys, path) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_our_file(capsys, exported):
    path, sd, _ = exported
    s = inspect_json(capsys, path)
    assert s["modules"] == {"unet": 277, "text_encoder": 72, "conv": 85, "total": 349}
    assert s["key_count"] == len(sd) == 3 * 349 and s["key_styles"] == {"kohya": 3 * 349}
    # conv 3x3 modules have rank 2, everything else rank 4; one alpha per file (export folds the conv scale).
    assert s["ranks"] == {"4": 299, "2": 50}
    assert s["alphas"] == {"2": 349}
    assert s["dtypes"] == {"F16": 3 * 349}
    assert s["size_bytes"] == path.stat().st_size
    assert set(s["hashes"]) == {"sshs_model_hash", "sshs_legacy_hash"} and len(s["hashes"]["sshs_legacy_hash"]) == 8
    assert s["metadata"]["ss_output_name"] == "tiny"
    assert s["metadata"]["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert s["unrecognized_keys"] == []
    for loader in ("a1111", "forge", "comfyui", "diffusers"):
        v = s["loaders"][loader]
        assert v["ok"] and v["applied_modules"] == 349 and v["ignored_keys"] == [] and not v["rejected"], loader
    # InvokeAI reads the base model off the cross-attention width: 32 here, 768 for SD 1.x.
    assert s["loaders"]["invokeai"]["rejected"] and "768" in s["loaders"]["invokeai"]["reason"]


def test_inspect_text_output(capsys, exported):
    path, _, _ = exported
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "277 UNet (85 conv) + 72 text encoder = 349" in out
    assert "AUTOMATIC1111  349/349 modules applied  ok" in out
    assert "ss_output_name" in out and "sshs_model_hash=" in out


def test_inspect_missing_alpha_is_reported(capsys, exported, tmp_path):
    _, sd, _ = exported
    path = tmp_path / "noalpha.safetensors"
    safetensors.torch.save_file({k: v for k, v in sd.items() if not k.endswith(".alpha")}, str(path))
    s = inspect_json(capsys, path)
    assert s["alphas"] == {"none": 349} and s["scales"] == {"1 (no alpha)": 349}
    assert s["metadata"] == {} and s["hashes"] == {}
    for loader in ("a1111", "forge", "comfyui", "diffusers"):
        assert s["loaders"][loader]["missing_alpha"] == 349 and not s["loaders"][loader]["ok"], loader


def test_inspect_dotted_diffusers_file(capsys, exported, tmp_path):
    _, _, c = exported
    from peft.utils import get_peft_model_state_dict

    tensors = {f"unet.{k}": v for k, v in get_peft_model_state_dict(c["unet"]).items()}
    tensors.update({f"text_encoder.{normalize_text_encoder_name(k)}": v
                    for k, v in get_peft_model_state_dict(c["text_encoder"]).items()})
    assert any(k.endswith("attn1.to_q.lora_A.weight") for k in tensors)
    path = tmp_path / "dotted.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    s = inspect_json(capsys, path)
    assert s["modules"]["total"] == 349 and s["key_styles"] == {"diffusers": 2 * 349}
    assert s["alphas"] == {"none": 349}
    v = s["loaders"]
    assert v["a1111"]["applied_modules"] == 0 and len(v["a1111"]["ignored_keys"]) == 2 * 349
    assert v["forge"]["rejected"] and v["invokeai"]["rejected"]
    assert 0 < v["comfyui"]["applied_modules"] < 349
    assert v["diffusers"]["applied_modules"] == 349 and v["diffusers"]["ignored_keys"] == []


def test_inspect_te1_and_unknown_keys(capsys, exported, tmp_path):
    _, sd, _ = exported
    tensors = {k.replace("lora_te_", "lora_te1_"): v for k, v in sd.items() if k.startswith("lora_te_")}
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 2)
    path = tmp_path / "te1.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    s = inspect_json(capsys, path)
    assert s["key_styles"] == {"kohya-te1": 3 * 72}
    assert s["modules"] == {"unet": 0, "text_encoder": 72, "conv": 0, "total": 72}
    assert s["unrecognized_keys"] == ["lora_unet_not_a_module.lora_down.weight"]
    assert s["loaders"]["a1111"]["ignored_keys"] == ["lora_unet_not_a_module.lora_down.weight"]
    assert s["loaders"]["a1111"]["applied_modules"] == 72


@pytest.mark.parametrize("content", [None, b"", b"not a safetensors file at all", "truncated"])
def test_inspect_bad_files_are_user_errors(capsys, exported, tmp_path, content):
    path = tmp_path / "bad.safetensors"
    if content == "truncated":
        data = exported[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    assert main(["inspect", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: inspect: ") and str(path) in captured.err
    assert "Traceback" not in captured.err
    if content == "truncated":
        assert "truncated" in captured.err


def test_inspect_reads_alpha_from_diffusers_adapter_metadata(capsys, tmp_path):
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {}, "unet.alpha_pattern": {"proj_out": 2}}
    tensors = {}
    for block in ("proj_in", "proj_out"):
        tensors[f"unet.down_blocks.0.attentions.0.{block}.lora_A.weight"] = torch.ones(4, 320, 1, 1)
        tensors[f"unet.down_blocks.0.attentions.0.{block}.lora_B.weight"] = torch.ones(320, 4, 1, 1)
    path = tmp_path / "meta.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    s = inspect_json(capsys, path)
    assert s["alphas"] == {"2 (adapter config)": 1, "8 (adapter config)": 1}
    assert s["scales"] == {"0.5": 1, "2": 1}
    assert s["lora_adapter_metadata"]["unet.lora_alpha"] == 8
    assert main(["inspect", str(path)]) == 0
    assert "lora-offset convert" in capsys.readouterr().out  # the hint for files the web UIs cannot read

    # The same weights as a PEFT adapter folder: alphas come from adapter_config.json.
    folder = tmp_path / "peft"
    folder.mkdir()
    safetensors.torch.save_file({k.replace("unet.", "base_model.model.", 1): v for k, v in tensors.items()},
                                str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({k[5:]: v for k, v in meta.items()}))
    s = inspect_json(capsys, folder)
    assert s["key_styles"] == {"peft": 4} and s["scales"] == {"0.5": 1, "2": 1}
