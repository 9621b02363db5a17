"""`lora-offset resize`: each module is the SVD optimum at its new rank; kohya's dynamic rank rules;
the output loads everywhere with the deltas it claims."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from lora_offset.cli import main
from lora_offset.formats import loaders
from lora_offset.formats.reader import read_adapter
from lora_offset.tools import resize

UNET_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
UNET_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-model LoRA as the trainer exports it: rank 8 attention + text encoder, rank 4 conv with
    its own alpha (folded into lora_up by the exporter), random non-zero factors, fp32."""
    from lora_offset.formats.kohya import kohya_state_dict, save_lora
    from lora_offset.tiny import build_tiny_components
    from lora_offset.training.networks import add_lora, text_encoder_lora_config, unet_lora_config

    c = build_tiny_components(seed=0)
    add_lora(c["unet"], unet_lora_config(8, 4.0, conv_rank=4, conv_alpha=1.0))
    add_lora(c["text_encoder"], text_encoder_lora_config(8, 4.0))
    g = torch.Generator().manual_seed(1)
    for model in (c["unet"], c["text_encoder"]):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = 0.1 * torch.randn(p.shape, generator=g)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
            "ss_output_name": "big", "ss_steps": "1234", "ss_training_comment": "my subject"}
    folder = tmp_path_factory.mktemp("resize")
    return save_lora(folder / "big.safetensors", kohya_state_dict(c["unet"], c["text_encoder"]), meta, precision="fp32")


def deltas(path) -> dict[str, torch.Tensor]:
    """{kohya key: scale * up @ down (float64, flattened)} of a LoRA file, as every loader computes it."""
    return {m.kohya_key: m.scale * m.up.double().reshape(m.up.shape[0], -1) @ m.down.double().reshape(m.rank, -1)
            for m in read_adapter(path, "test").modules.values()}


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("fp16", 2e-3)])
def test_every_module_is_the_svd_truncation_and_the_error_is_the_dropped_norm(trained, tmp_path, precision, tolerance):
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(trained), str(out), "--rank", "3", "--conv-rank", "2", "--precision", precision]) == 0
    before, after = deltas(trained), deltas(out)
    assert set(after) == set(before) and len(before) == 349  # 277 UNet (85 conv) + 72 text encoder
    modules = {m.kohya_key: m for m in read_adapter(out, "test").modules.values()}
    for key, delta in before.items():
        conv3x3 = modules[key].down.dim() == 4 and modules[key].down.shape[-1] == 3
        rank = 2 if conv3x3 else 3
        assert modules[key].rank == rank, key
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # an independent dense SVD
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        scale = float(delta.norm())
        assert float((after[key] - best).norm()) <= tolerance * scale, key
        dropped = float(s[rank:].pow(2).sum().sqrt())
        assert abs(float((delta - after[key]).norm()) - dropped) <= tolerance * scale, key
    tensors = safetensors.torch.load_file(str(out))
    assert {t.dtype for t in tensors.values()} == {dict(fp32=torch.float32, fp16=torch.float16)[precision]}
    assert len({float(t) for k, t in tensors.items() if k.endswith(".alpha")}) == 1  # one alpha, as the exporter


def test_metadata_keeps_the_training_record_and_gets_new_hashes(trained, tmp_path):
    out = tmp_path / "small.safetensors"
    resize.resize_file(trained, out, rank=3, conv_rank=2)
    before = safetensors.safe_open(str(trained), "pt").metadata()
    meta = safetensors.safe_open(str(out), "pt").metadata()
    assert meta["ss_steps"] == "1234" and meta["ss_output_name"] == "small"
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"  # alpha / rank 4 / 8 kept at rank 3
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 3 (conv: 2); my subject"
    assert json.loads(meta["lora_offset.resize"]) == {"rank": 3, "conv_rank": 2, "dynamic": None, "param": None}
    assert meta["sshs_model_hash"] != before["sshs_model_hash"] and len(meta["sshs_legacy_hash"]) == 8
    assert {t.dtype for t in safetensors.torch.load_file(str(out)).values()} == {torch.float32}  # the input's precision


def orthonormal(rows, cols, seed):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def spectrum_module(key, spectrum, out_features=40, in_features=30, seed=0):
    """A kohya module whose delta has exactly the given singular values (alpha = rank: scale 1)."""
    rank = len(spectrum)
    up = orthonormal(out_features, rank, seed) * torch.tensor(spectrum, dtype=torch.float64)
    down = orthonormal(in_features, rank, seed + 1).T
    return {f"{key}.lora_down.weight": down.float().contiguous(), f"{key}.lora_up.weight": up.float().contiguous(),
            f"{key}.alpha": torch.tensor(float(rank))}


@pytest.mark.parametrize("method, param, cap, expected", [
    # spectra: q = [8, 4, 2, 1, 0.5, 0.25] (rank 6), k = [1, 1, 1] (rank 3); each padded with zeros to
    # min(40, 30) = 30 values, as kohya's SVD of the full delta gives them.
    ("sv_ratio", 3.0, None, {UNET_Q: 3, UNET_K: 3}),     # q: s > 8/3 -> 2 counted, +1; k: 3 counted, +1 = 4 > rank 3
    ("sv_cumulative", 0.9, None, {UNET_Q: 5, UNET_K: 3}),  # q: 8+4+2+1 = 15 >= 0.9 * 15.75 -> 4 counted, +1
    ("sv_fro", 0.9, None, {UNET_Q: 3, UNET_K: 3}),        # q: 64+16 = 80 >= 0.81 * 85.31 -> 2 counted, +1
    ("sv_cumulative", 0.9, 2, {UNET_Q: 2, UNET_K: 2}),   # --rank caps the dynamic choice
])
def test_dynamic_methods_pick_kohyas_ranks_on_a_constructed_spectrum(tmp_path, method, param, cap, expected):
    src = tmp_path / "spectra.safetensors"
    safetensors.torch.save_file({**spectrum_module(UNET_Q, [8, 4, 2, 1, 0.5, 0.25]),
                                 **spectrum_module(UNET_K, [1, 1, 1], seed=5)}, str(src))
    out = tmp_path / "dynamic.safetensors"
    resized = resize.resize_file(src, out, rank=cap, method=method, param=param, precision="fp32")
    assert {r.key: r.rank for r in resized} == expected
    kept = {r.key: r.frobenius_kept for r in resized}
    spectrum = torch.tensor([8, 4, 2, 1, 0.5, 0.25], dtype=torch.float64)
    assert kept[UNET_Q] == pytest.approx(math.sqrt(float(spectrum[: expected[UNET_Q]].pow(2).sum() / spectrum.pow(2).sum())))
    after = {m.kohya_key: m for m in read_adapter(out, "test").modules.values()}
    s = torch.linalg.svdvals(after[UNET_Q].scale * after[UNET_Q].up.double() @ after[UNET_Q].down.double())
    torch.testing.assert_close(s[: expected[UNET_Q]], spectrum[: expected[UNET_Q]], rtol=1e-5, atol=1e-5)
    assert safetensors.safe_open(str(out), "pt").metadata()["ss_network_dim"] == "Dynamic"


def pipeline_outputs(pipe):
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return hidden, pipe.unet(latents, 500, encoder_hidden_states=hidden).sample


def load_pipe(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def test_output_passes_the_loader_suite_and_loads_in_diffusers(trained, tiny_model_dir, tmp_path):
    from lora_offset.tools.merge import merge_checkpoint

    out = tmp_path / "dynamic.safetensors"
    resized = resize.resize_file(trained, out, rank=6, method="sv_fro", param=0.8)  # ranks differ: alphas folded
    assert len({r.rank for r in resized}) > 1
    keys = safetensors.safe_open(str(out), "pt").keys()
    for name, result in loaders.match_all(keys, loaders.tiny_model_names()).items():
        assert result.ok and len(result.applied_modules) == 349, (name, result.reason)
    # diffusers applies exactly the deltas lora-offset merge bakes.
    pipe = load_pipe(tiny_model_dir)
    pipe.load_lora_weights(str(out))
    merged = tmp_path / "merged"
    merge_checkpoint(tiny_model_dir, [(out, 1.0)], merged)
    base = pipeline_outputs(load_pipe(tiny_model_dir))
    for got, expected, before in zip(pipeline_outputs(pipe), pipeline_outputs(load_pipe(merged)), base):
        assert (expected - before).abs().max() > 100 * (got - expected).abs().max()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_resize_to_the_full_rank_changes_nothing(trained, tmp_path):
    out = tmp_path / "same.safetensors"
    resize.resize_file(trained, out, rank=8)
    before, after = deltas(trained), deltas(out)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-6)


def test_verbose_cli_and_bad_input(trained, tmp_path, capsys):
    out = tmp_path / "v.safetensors"
    assert main(["resize", str(trained), str(out), "--dynamic", "sv_ratio", "--param", "2", "--verbose"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 349 + 1 and lines[-1].startswith(f"wrote {out}: 349 modules at rank")
    assert any(line.startswith(UNET_Q) and "rank   8 -> " in line and "Frobenius norm kept" in line for line in lines)
    for argv, message in [
        ([str(trained), str(out)], "give --rank R, or --dynamic METHOD --param P"),
        ([str(trained), str(out), "--dynamic", "sv_fro"], "--dynamic sv_fro needs --param P"),
        ([str(trained), str(out), "--dynamic", "sv_fro", "--param", "1.5"], "P must be in (0, 1]"),
        ([str(trained), str(out), "--dynamic", "sv_ratio", "--param", "0.5"], "P must be >= 1"),
        ([str(trained), str(trained), "--rank", "2"], "is the input file"),
        ([str(tmp_path / "missing.safetensors"), str(out), "--rank", "2"], "missing.safetensors: no such file"),
    ]:
        assert main(["resize", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: resize: ") and message in err, (argv, err)
    assert main(["resize", str(trained), str(out), "--rank", "0"]) == 2  # checked as it is parsed
    assert capsys.readouterr().err.splitlines()[-1] == (
        "lora-offset resize: error: argument --rank: 0 is out of range; give a whole number from 1 to 1280")
