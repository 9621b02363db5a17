"""`lora-offset extract`: merge a known LoRA into the tiny checkpoint, extract it back."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lora_offset.cli import main
from lora_offset.formats import loaders
from lora_offset.formats.reader import read_adapter

TE_MODULES, ATTENTION_MODULES, CONV_MODULES = 72, 192, 85


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """The tiny model as an LDM single file, a known LoRA (rank 4 attention and text encoder, rank 2
    3x3 convs, other alphas), the single file with that LoRA merged by `lora-offset merge`, and the
    same with an attention-only LoRA merged."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lora_offset.formats.kohya import kohya_state_dict, save_lora
    from lora_offset.formats.ldm import save_ldm_checkpoint
    from lora_offset.tiny import build_tiny_components
    from lora_offset.training.networks import add_lora, text_encoder_lora_config, unet_lora_config

    folder = tmp_path_factory.mktemp("extract")
    base = save_ldm_checkpoint({"unet": UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"),
                                "vae": AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae"),
                                "text_encoder": CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")},
                               folder / "base.safetensors")
    files = {"base": base}
    for name, conv, te in (("known", True, True), ("attention", False, False)):
        c = build_tiny_components(seed=0)
        add_lora(c["unet"], unet_lora_config(4, 2.0, conv_rank=2 if conv else 0, conv_alpha=1.0))
        if te:
            add_lora(c["text_encoder"], text_encoder_lora_config(4, 8.0))
        g = torch.Generator().manual_seed(7)
        for model in (c["unet"], c["text_encoder"]):
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.data = 0.05 * torch.randn(p.shape, generator=g)
        files[name] = save_lora(folder / f"{name}.safetensors",
                                kohya_state_dict(c["unet"], c["text_encoder"] if te else None), {}, precision="fp32")
        files[f"tuned-{name}"] = folder / f"tuned-{name}.safetensors"
        assert main(["merge", "--base", str(base), "--lora", str(files[name]), "--out", str(files[f"tuned-{name}"])]) == 0
    return files


def deltas(path) -> dict[str, torch.Tensor]:
    return {m.kohya_key: m.scale * m.up.double().reshape(m.up.shape[0], -1) @ m.down.double().reshape(m.rank, -1)
            for m in read_adapter(path, "test").modules.values()}


@pytest.mark.parametrize("base_kind", ["single file", "diffusers folder"])
def test_extracting_at_the_lora_rank_gives_the_lora_back(checkpoints, tiny_model_dir, tmp_path, capsys, base_kind):
    base = checkpoints["base"] if base_kind == "single file" else tiny_model_dir  # any mix of layouts
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(base), "--tuned", str(checkpoints["tuned-known"]),
                 "--rank", "4", "--conv-rank", "2", str(out)]) == 0
    assert f"{ATTENTION_MODULES + CONV_MODULES} UNet + {TE_MODULES} text-encoder modules" in capsys.readouterr().out
    known, extracted = deltas(checkpoints["known"]), deltas(out)
    assert set(extracted) == set(known)
    for key, delta in known.items():  # fp16 output: equal within fp16 rounding
        assert float((extracted[key] - delta).norm()) <= 2e-3 * float(delta.norm()), key
    assert {t.dtype for t in safetensors.torch.load_file(str(out)).values()} == {torch.float16}
    for name, result in loaders.match_all(safetensors.safe_open(str(out), "pt").keys(), loaders.tiny_model_names()).items():
        assert result.ok and len(result.applied_modules) == 349, (name, result.reason)


def test_a_lower_rank_gives_the_svd_optimum(checkpoints, tmp_path):
    out = tmp_path / "low.safetensors"
    assert main(["extract", "--base", str(checkpoints["base"]), "--tuned", str(checkpoints["tuned-known"]),
                 "--rank", "2", "--conv-rank", "1", "--precision", "fp32", str(out)]) == 0
    known, extracted = deltas(checkpoints["known"]), deltas(out)
    modules = {m.kohya_key: m for m in read_adapter(out, "test").modules.values()}
    for key, delta in known.items():
        rank = 1 if modules[key].down.dim() == 4 and modules[key].down.shape[-1] == 3 else 2
        assert modules[key].rank == rank
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        assert float((extracted[key] - best).norm()) <= 1e-4 * float(delta.norm()), key
    meta = safetensors.safe_open(str(out), "pt").metadata()
    assert json.loads(meta["lora_offset.extract"])["rank"] == 2 and meta["ss_network_dim"] == "2"


def test_text_encoder_and_unchanged_modules(checkpoints, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    # No text-encoder LoRA, conv targets asked for: the text encoder and the unchanged convs are left out.
    assert main(["extract", "--base", str(checkpoints["base"]), "--tuned", str(checkpoints["tuned-attention"]),
                 "--rank", "4", "--conv-rank", "2", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{ATTENTION_MODULES} UNet + no text-encoder" in printed and f"{CONV_MODULES} unchanged modules left out" in printed
    assert len(deltas(out)) == ATTENTION_MODULES
    # A text encoder that differs by less than --min-diff is left out too.
    assert main(["extract", "--base", str(checkpoints["base"]), "--tuned", str(checkpoints["tuned-known"]),
                 "--rank", "4", "--min-diff", "100", str(out)]) == 0
    assert "no text-encoder" in capsys.readouterr().out
    assert not any(k.startswith("lora_te_") for k in deltas(out))


def test_clamp_quantile_clamps_the_svd_factors_as_kohya(checkpoints, tmp_path):
    from lora_offset.lowrank import clamp_to_quantile

    outs = {}
    for name, extra in (("plain", []), ("clamped", ["--clamp-quantile", "0.5"])):
        outs[name] = tmp_path / f"{name}.safetensors"
        assert main(["extract", "--base", str(checkpoints["base"]), "--tuned", str(checkpoints["tuned-attention"]),
                     "--rank", "4", "--precision", "fp32", *extra, str(outs[name])]) == 0
    plain, clamped = (read_adapter(outs[n], "test").modules for n in ("plain", "clamped"))
    changed = 0
    for where, module in plain.items():
        up, down = clamp_to_quantile(module.up, module.down, 0.5)
        torch.testing.assert_close(clamped[where].up, up, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(clamped[where].down, down, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(up, module.up)
    assert changed == len(plain)


def test_bad_input(checkpoints, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    base = str(checkpoints["base"])
    pickled = tmp_path / "tuned.ckpt"
    pickled.write_bytes(b"never unpickled without the opt-in")
    for argv, message in [
        (["--base", base, "--tuned", base, "--rank", "4", str(out)], "same weights in every LoRA target: nothing to extract"),
        (["--base", base, "--tuned", str(tmp_path / "nope.safetensors"), "--rank", "4", str(out)], "nope.safetensors: no such file"),
        (["--base", base, "--tuned", base, "--rank", "2", str(tmp_path / "x.ckpt")], "must end in .safetensors"),
        (["--base", base, "--tuned", str(checkpoints["known"]), "--rank", "2", str(out)], "is not an SD 1.x checkpoint"),
        (["--base", base, "--tuned", str(pickled), "--rank", "2", str(out)], "--allow-pickle"),
    ]:
        assert main(["extract", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    for argv, line in [  # checked as the command line is parsed (lora_offset.arguments)
        (["--rank", "0"], "argument --rank: 0 is out of range; give a whole number from 1 to 1280"),
        (["--rank", "2", "--clamp-quantile", "2"],
         "argument --clamp-quantile: 2 is out of range; give a number above 0 and at most 1"),
    ]:
        assert main(["extract", "--base", base, "--tuned", base, *argv, str(out)]) == 2, argv
        assert capsys.readouterr().err.splitlines()[-1] == f"lora-offset extract: error: {line}"
    assert not out.exists()
