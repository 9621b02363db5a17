"""`lora-offset merge` without --base: one LoRA whose effect is the weighted sum of the inputs' effects."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch

from lora_offset.cli import main
from lora_offset.formats import loaders
from lora_offset.formats.reader import read_adapter
from lora_offset.tools.merge import merge_checkpoint

RATIOS = (0.6, -0.4)


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    """A: rank 4 / alpha 2 attention, rank 2 / alpha 3 conv, rank 4 / alpha 8 text encoder (fp32).
    B: rank 2 / alpha 4 attention only (fp16). Different ranks, alphas, modules and precisions."""
    from lora_offset.formats.kohya import kohya_state_dict, save_lora
    from lora_offset.tiny import build_tiny_components
    from lora_offset.training.networks import add_lora, text_encoder_lora_config, unet_lora_config

    folder = tmp_path_factory.mktemp("merge-loras")
    paths = []
    for name, unet_config, te_config, precision, seed in (
        ("a", unet_lora_config(4, 2.0, conv_rank=2, conv_alpha=3.0), text_encoder_lora_config(4, 8.0), "fp32", 1),
        ("b", unet_lora_config(2, 4.0), None, "fp16", 2),
    ):
        c = build_tiny_components(seed=0)
        add_lora(c["unet"], unet_config)
        if te_config is not None:
            add_lora(c["text_encoder"], te_config)
        g = torch.Generator().manual_seed(seed)
        for model in (c["unet"], c["text_encoder"]):
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.data = 0.1 * torch.randn(p.shape, generator=g)
        state = kohya_state_dict(c["unet"], c["text_encoder"] if te_config is not None else None)
        paths.append(save_lora(folder / f"{name}.safetensors", state, {"ss_base_model_version": "sd_v1"}, precision=precision))
    return paths


def deltas(path) -> dict[str, torch.Tensor]:
    return {m.kohya_key: m.scale * m.up.double().reshape(m.up.shape[0], -1) @ m.down.double().reshape(m.rank, -1)
            for m in read_adapter(path, "test").modules.values()}


def weighted_sum(paths) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, ratio in zip(paths, RATIOS):
        for key, delta in deltas(path).items():
            total[key] = total[key] + ratio * delta if key in total else ratio * delta
    return total


def merge_args(paths, out, *extra):
    return ["merge", "--lora", f"{paths[0]}:{RATIOS[0]}", "--lora", f"{paths[1]}:{RATIOS[1]}", "--out", str(out), *extra]


def test_concat_is_exact(two_loras, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(merge_args(two_loras, out)) == 0
    assert "concatenated (exact): 349 modules" in capsys.readouterr().out
    expected, got = weighted_sum(two_loras), deltas(out)
    assert set(got) == set(expected) and len(got) == 349  # B's 192 attention modules are among A's 349
    for key, delta in expected.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-5, atol=1e-5 * float(delta.abs().max()))
    ranks = {m.kohya_key: m.rank for m in read_adapter(out, "test").modules.values()}
    assert ranks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 4 + 2
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 2 and ranks["lora_te_text_model_encoder_layers_0_mlp_fc1"] == 4
    meta = safetensors.safe_open(str(out), "pt").metadata()
    record = json.loads(meta["lora_offset.merged_loras"])
    assert [(r["file"], r["ratio"]) for r in record] == [("a.safetensors", RATIOS[0]), ("b.safetensors", RATIOS[1])]
    assert [r["sha256"] for r in record] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in two_loras]
    assert meta["ss_base_model_version"] == "sd_v1" and "sshs_model_hash" in meta
    assert {t.dtype for t in safetensors.torch.load_file(str(out)).values()} == {torch.float32}  # inputs mix fp32 and fp16


def test_rank_is_the_svd_optimum_of_the_sum(two_loras, tmp_path):
    out = tmp_path / "r.safetensors"
    assert main(merge_args(two_loras, out, "--rank", "3", "--conv-rank", "1", "--precision", "fp32")) == 0
    expected, got = weighted_sum(two_loras), deltas(out)
    modules = {m.kohya_key: m for m in read_adapter(out, "test").modules.values()}
    for key, delta in expected.items():
        rank = 1 if modules[key].down.dim() == 4 and modules[key].down.shape[-1] == 3 else 3
        assert modules[key].rank == rank
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        size = float(delta.norm())
        assert float((got[key] - best).norm()) <= 1e-5 * size, key
        assert abs(float((delta - got[key]).norm()) - float(s[rank:].pow(2).sum().sqrt())) <= 1e-5 * size, key


def test_merged_lora_acts_like_the_two_loras_and_loads_everywhere(two_loras, tiny_model_dir, tmp_path):
    out = tmp_path / "c.safetensors"
    assert main(merge_args(two_loras, out)) == 0
    for name, result in loaders.match_all(safetensors.safe_open(str(out), "pt").keys(), loaders.tiny_model_names()).items():
        assert result.ok and len(result.applied_modules) == 349, (name, result.reason)
    merge_checkpoint(tiny_model_dir, list(zip(two_loras, RATIOS)), tmp_path / "with-two")
    merge_checkpoint(tiny_model_dir, [(out, 1.0)], tmp_path / "with-one")
    for component in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        two = safetensors.torch.load_file(str(tmp_path / "with-two" / component))
        one = safetensors.torch.load_file(str(tmp_path / "with-one" / component))
        for key in two:
            torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def test_a_quantized_base_note_survives_the_merge(two_loras, tmp_path, tiny_model_dir, caplog):
    """A LoRA trained on an NF4 base keeps saying so after a LoRA merge, so `merge --base` still warns."""
    import logging

    from lora_offset.formats.kohya import save_lora
    from lora_offset.tools.merge_loras import merge_lora_files
    from lora_offset.tools.resize import resize_file

    tensors = safetensors.torch.load_file(two_loras[1])
    nf4 = save_lora(tmp_path / "nf4.safetensors", tensors, {"ss_base_model_version": "sd_v1",
                                                            "lora_offset.base_precision": "nf4"})
    merged = tmp_path / "merged.safetensors"
    merge_lora_files([(two_loras[0], 1.0), (nf4, 0.5)], merged)
    meta = read_adapter(merged, "test").metadata
    assert meta["lora_offset.base_precision"] == "nf4"
    assert [e.get("trained_on_base_precision") for e in json.loads(meta["lora_offset.merged_loras"])] == [None, "nf4"]
    plain = tmp_path / "plain.safetensors"
    merge_lora_files([(two_loras[0], 1.0), (two_loras[1], 0.5)], plain)
    assert "lora_offset.base_precision" not in read_adapter(plain, "test").metadata
    resized = tmp_path / "resized.safetensors"
    resize_file(merged, resized, rank=2)
    assert read_adapter(resized, "test").metadata["lora_offset.base_precision"] == "nf4"  # derived files keep it
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        merge_checkpoint(tiny_model_dir, [(resized, 1.0)], tmp_path / "model")
    assert "note: resized.safetensors was trained against an NF4 (4-bit) copy of its base UNet" in caplog.text


def test_bad_arguments(two_loras, tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "c.safetensors"
    for argv, message in [
        (merge_args(two_loras, out, "--concat", "--rank", "2"), "--concat and --rank exclude each other"),
        (merge_args(two_loras, out, "--conv-rank", "2"), "--conv-rank needs --rank"),
        (merge_args(two_loras, tmp_path / "c.ckpt"), "end --out in .safetensors"),
        (merge_args(two_loras, two_loras[0]), "is one of the input LoRAs"),
        (merge_args(two_loras, out, "--base", str(tiny_model_dir), "--rank", "2"), "--rank applies to merging LoRAs into one LoRA"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: merge: ") and message in err, (argv, err)
    # numbers are checked as the command line is parsed (lora_offset.arguments): argparse's one error line
    assert main(merge_args(two_loras, out, "--rank", "0")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "lora-offset merge: error: argument --rank: 0 is out of range; give a whole number from 1 to 1280")
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    other = tmp_path / "other.safetensors"  # the same module with another in-width: another model
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.ones(2, 64, 1, 1),
                                 f"{key}.lora_up.weight": torch.ones(32, 2, 1, 1)}, str(other))
    assert main(["merge", "--lora", str(two_loras[0]), "--lora", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unet.down_blocks.0.attentions.0.proj_in changes a (32, 32, 1, 1) weight" in err and "other.safetensors" in err
    assert not out.exists()
