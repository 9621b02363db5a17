"""`lora-offset merge`: the merge math, and merged checkpoints equal to base + PEFT adapters."""

import filecmp
import json

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from lora_offset.cli import main
from lora_offset.errors import UserError
from lora_offset.formats import checkpoint, ldm
from lora_offset.formats.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name
from lora_offset.formats.modules import AdapterModule
from lora_offset.formats.reader import read_adapter
from lora_offset.lowrank import lora_delta
from lora_offset.training.networks import text_encoder_lora_config, unet_lora_config
from lora_offset.tools import merge

RATIOS = {"a": 0.7, "b": -0.4}


def load_models(folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))


def kohya_state_dict(model, prefix, adapter, te_prefix_alias=None):
    """A PEFT adapter as kohya keys: lora_down = lora_A, lora_up = lora_B, alpha = scaling * r."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = kohya_name(prefix, name)
            if te_prefix_alias:
                key = key.replace(prefix + "_", te_prefix_alias, 1)
            out[f"{key}.lora_down.weight"] = module.lora_A[adapter].weight.detach().clone()
            out[f"{key}.lora_up.weight"] = module.lora_B[adapter].weight.detach().clone()
            out[f"{key}.alpha"] = torch.tensor(module.scaling[adapter] * module.r[adapter])
    return out


@pytest.fixture(scope="module")
def adapted(tiny_model_dir, tmp_path_factory):
    """Two LoRAs on the tiny model (a: attention + conv LoRA + TE; b: attention + TE via lora_te1_),
    their kohya files, and the PEFT model with both active at RATIOS (the expected merge)."""
    folder = tmp_path_factory.mktemp("loras")
    unet, text_encoder = load_models(tiny_model_dir)
    unet.add_adapter(unet_lora_config(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0), adapter_name="a")
    unet.add_adapter(unet_lora_config(rank=2, alpha=4.0), adapter_name="b")
    text_encoder.add_adapter(text_encoder_lora_config(rank=4, alpha=8.0), adapter_name="a")
    text_encoder.add_adapter(text_encoder_lora_config(rank=2, alpha=1.0), adapter_name="b")
    g = torch.Generator().manual_seed(1)
    for model in (unet, text_encoder):
        for name, p in model.named_parameters():
            if "lora_" in name:  # PEFT initialises lora_B to zero: make every delta non-zero
                p.data = 0.2 * torch.randn(p.shape, generator=g)
    files = {}
    for adapter in ("a", "b"):
        state = kohya_state_dict(unet, UNET_PREFIX, adapter)
        state.update(kohya_state_dict(text_encoder, TEXT_ENCODER_PREFIX, adapter,
                                      te_prefix_alias="lora_te1_" if adapter == "b" else None))
        files[adapter] = folder / f"{adapter}.safetensors"
        save_file(state, str(files[adapter]), metadata={"sshs_model_hash": f"hash-{adapter}"})
    deltas = {}  # {(model, weight name): ratio-weighted PEFT delta}
    for model_name, model in (("unet", unet), ("text_encoder", text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                module.set_adapter(list(RATIOS))
                for adapter, ratio in RATIOS.items():
                    if adapter in module.lora_A:
                        delta = ratio * module.get_delta_weight(adapter)
                        key = (model_name, name + ".weight")
                        deltas[key] = deltas[key] + delta if key in deltas else delta
                        module.scaling[adapter] *= ratio
    return {"files": files, "unet": unet.eval(), "text_encoder": text_encoder.eval(), "deltas": deltas}


def model_outputs(unet, text_encoder, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 500, (2, 77), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden = text_encoder(tokens)[0]
        noise = unet(latents, torch.tensor([10, 700]), encoder_hidden_states=hidden).sample
    return hidden, noise


def lora_arguments(adapted):
    return [(adapted["files"][a], r) for a, r in RATIOS.items()]


# ---------------------------------------------------------------------------------- math


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_merged_weight_equals_base_plus_lora_path(kind):
    g = torch.Generator().manual_seed(0)
    r, n_in, n_out, alpha, ratio = 3, 5, 4, 6.0, 0.8
    x = torch.randn(2, n_in, 6, 6, generator=g, dtype=torch.float64)
    if kind == "linear":
        w, down, up = torch.randn(n_out, n_in, generator=g), torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
        x = x[:, :, 0, 0]
        apply = apply_up = F.linear
    else:
        k = 1 if kind == "conv1x1" else 3
        w = torch.randn(n_out, n_in, k, k, generator=g)
        down, up = torch.randn(r, n_in, k, k, generator=g), torch.randn(n_out, r, 1, 1, generator=g)
        apply = lambda t, weight: F.conv2d(t, weight, padding=k // 2)  # noqa: E731
        apply_up = F.conv2d  # lora_up is 1x1
    delta = ratio * lora_delta(down, up, alpha / r)
    assert delta.dtype == torch.float32 and delta.shape == w.shape
    expected = apply(x, w.double()) + ratio * (alpha / r) * apply_up(apply(x, down.double()), up.double())
    torch.testing.assert_close(apply(x, (w + delta).double()), expected, rtol=1e-5, atol=1e-5)


def test_parse_lora_argument():
    assert merge.parse_lora_argument("a.safetensors") == (merge.Path("a.safetensors"), 1.0)
    assert merge.parse_lora_argument("a.safetensors:0.5") == (merge.Path("a.safetensors"), 0.5)
    assert merge.parse_lora_argument("dir/a.safetensors:-1e-1") == (merge.Path("dir/a.safetensors"), -0.1)
    assert merge.parse_lora_argument("C:\\loras\\a.safetensors") == (merge.Path("C:\\loras\\a.safetensors"), 1.0)


def test_merge_into_state_dict_rejects_unmatched_and_mismatched_keys():
    base = {"w": torch.zeros(4, 3)}
    good = {"lora_unet_x": AdapterModule.lora("unet", "x", torch.ones(2, 3), torch.ones(4, 2), 1.0)}
    extra = {f"lora_unet_missing_{i}": good["lora_unet_x"] for i in range(7)}
    with pytest.raises(UserError, match=r"7 LoRA modules match no weight") as e:
        merge.merge_into_state_dict(base, [("l.safetensors", {**good, **extra}, 1.0)], {"lora_unet_x": "w"})
    assert str(e.value).count("lora_unet_missing_") == 5
    assert torch.equal(base["w"], torch.zeros(4, 3))  # nothing applied
    wrong = {"lora_unet_x": AdapterModule.lora("unet", "x", torch.ones(2, 5), torch.ones(4, 2), 1.0)}
    with pytest.raises(UserError, match="lora_unet_x has shape"):
        merge.merge_into_state_dict(base, [("l.safetensors", wrong, 1.0)], {"lora_unet_x": "w"})


def test_lora_files_are_read_by_the_shared_reader(tmp_path):
    """merge reads LoRAs with formats.reader: any kohya spelling; no alpha = scale 1.0; DoRA and
    half modules are refused naming the file and the key."""
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    path = tmp_path / "f.safetensors"
    save_file({f"{te}.lora_A.weight": torch.ones(1, 768), f"{te}.lora_B.weight": torch.ones(768, 1)}, str(path))
    modules = read_adapter(path, "merge").modules
    module = modules[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]
    assert module.kohya_key == "lora_te_text_model_encoder_layers_0_self_attn_q_proj" and module.scale == 1.0
    unet = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{unet}.lora_down.weight": torch.ones(1, 320, 1, 1), f"{unet}.lora_up.weight": torch.ones(320, 1, 1, 1),
               f"{unet}.dora_scale": torch.ones(320)}, str(path))
    with pytest.raises(UserError, match=rf"merge: .*f.safetensors: '{unet}.dora_scale' is a DoRA magnitude"):
        read_adapter(path, "merge")
    save_file({f"{unet}.lora_down.weight": torch.ones(1, 320, 1, 1)}, str(path))
    with pytest.raises(UserError, match="f.safetensors: module unet.down_blocks.0.attentions.0.proj_in has no lora_up"):
        read_adapter(path, "merge")


# ---------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def base_file(tiny_model_dir, tmp_path_factory):
    from diffusers import AutoencoderKL

    unet, text_encoder = load_models(tiny_model_dir)
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    return ldm.save_ldm_checkpoint({"unet": unet, "vae": vae, "text_encoder": text_encoder}, path,
                                          metadata={"modelspec.title": "tiny"})


def test_merge_into_single_file(tiny_model_dir, base_file, adapted, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "merged.safetensors"
    touched = merge.merge_checkpoint(base_file, lora_arguments(adapted), out)
    base, merged = load_file(str(base_file)), load_file(str(out))
    assert set(base) == set(merged)
    unet_config = UNet2DConditionModel.load_config(tiny_model_dir / "unet")
    key_map = ldm.derive_ldm_map({k: v for k, v in base.items() if not k.startswith("first_stage_model.")},
                                        unet_config, vae_config={})
    expected_touched = {key_map[m][k] for m, k in adapted["deltas"]}
    assert touched == expected_touched
    assert len(touched) == len(adapted["deltas"]) > 192 + 72  # attention + conv LoRA + TE
    for key in base:
        if key not in touched:
            assert torch.equal(base[key], merged[key]) and base[key].dtype == merged[key].dtype, key
    for (model, name), delta in adapted["deltas"].items():
        key = key_map[model][name]
        expected = base[key] + delta.reshape(base[key].shape)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # metadata: base's kept, the merged LoRAs recorded
    meta = checkpoint.read_metadata(out)
    assert meta["modelspec.title"] == "tiny"
    record = json.loads(meta[merge.METADATA_KEY])
    assert [(r["file"], r["ratio"], r["sshs_model_hash"]) for r in record] == [("a.safetensors", 0.7, "hash-a"), ("b.safetensors", -0.4, "hash-b")]
    assert record[0]["sha256"] == merge.file_sha256(adapted["files"]["a"])
    # The merged file loads with diffusers' own single-file loader (offline, local config) and
    # computes what base + the two PEFT adapters compute.
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model_dir), local_files_only=True)
    expected_hidden, expected_noise = model_outputs(adapted["unet"], adapted["text_encoder"])
    hidden, noise = model_outputs(pipe.unet, pipe.text_encoder)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(noise, expected_noise, rtol=1e-4, atol=1e-4)
    base_hidden, base_noise = model_outputs(*load_models(tiny_model_dir))
    assert (noise - base_noise).abs().max() > 100 * (noise - expected_noise).abs().max()  # the LoRAs matter
    assert (hidden - base_hidden).abs().max() > 100 * (hidden - expected_hidden).abs().max()


def test_merge_into_diffusers_folder(tiny_model_dir, adapted, tmp_path):
    out = tmp_path / "merged-model"
    merge.merge_checkpoint(tiny_model_dir, lora_arguments(adapted), out)
    unet, text_encoder = load_models(out)
    base_unet, base_te = load_models(tiny_model_dir)
    for model_name, merged_model, base_model in (("unet", unet, base_unet), ("text_encoder", text_encoder, base_te)):
        merged_sd, base_sd = merged_model.state_dict(), base_model.state_dict()
        for key in base_sd:
            delta = adapted["deltas"].get((model_name, key))
            if delta is None:
                assert torch.equal(merged_sd[key], base_sd[key]), key
            else:
                expected = base_sd[key] + delta.reshape(base_sd[key].shape)
                torch.testing.assert_close(merged_sd[key], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    hidden, noise = model_outputs(unet, text_encoder)
    expected_hidden, expected_noise = model_outputs(adapted["unet"], adapted["text_encoder"])
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(noise, expected_noise, rtol=1e-4, atol=1e-4)
    # everything else is copied byte for byte
    for rel in ("vae/diffusion_pytorch_model.safetensors", "model_index.json", "tokenizer/vocab.json", "unet/config.json"):
        assert filecmp.cmp(tiny_model_dir / rel, out / rel, shallow=False), rel
    record = json.loads(checkpoint.read_metadata(out / "unet" / "diffusion_pytorch_model.safetensors")[merge.METADATA_KEY])
    assert [r["ratio"] for r in record] == [0.7, -0.4]
    with pytest.raises(UserError, match="already exists"):
        merge.merge_checkpoint(tiny_model_dir, lora_arguments(adapted), out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_precision_casts_every_float_tensor(base_file, adapted, tmp_path):
    out = tmp_path / "half.safetensors"
    touched = merge.merge_checkpoint(base_file, [(adapted["files"]["a"], 0.7)], out, precision="fp16")
    base, merged = load_file(str(base_file)), load_file(str(out))
    assert {v.dtype for k, v in merged.items() if k.endswith("position_ids")} == {torch.int64}
    assert {v.dtype for k, v in merged.items() if not k.endswith("position_ids")} == {torch.float16}
    untouched = next(k for k in base if k not in touched and base[k].is_floating_point())
    assert torch.equal(merged[untouched], base[untouched].half())
    key = next(iter(touched))
    assert not torch.equal(merged[key], base[key].half())


def test_unmatched_lora_is_refused_and_nothing_is_written(base_file, tmp_path):
    lora = tmp_path / "other.safetensors"
    save_file({"lora_unet_not_a_module.lora_down.weight": torch.ones(1, 2),
               "lora_unet_not_a_module.lora_up.weight": torch.ones(2, 1)}, str(lora))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(UserError, match="other.safetensors: key 'lora_unet_not_a_module"):
        merge.merge_checkpoint(base_file, [(lora, 1.0)], out)
    assert not out.exists()
    xl = tmp_path / "xl.safetensors"
    save_file({"lora_te2_text_model_x.lora_down.weight": torch.ones(1, 2)}, str(xl))
    with pytest.raises(UserError, match="xl.safetensors: is an SDXL LoRA"):
        merge.merge_checkpoint(base_file, [(xl, 1.0)], out)


def test_bad_arguments(tiny_model_dir, base_file, adapted, tmp_path):
    with pytest.raises(UserError, match="must differ from --base"):
        merge.merge_checkpoint(base_file, [(adapted["files"]["a"], 1.0)], base_file)
    with pytest.raises(UserError, match=r"end --out in \.safetensors"):
        merge.merge_checkpoint(base_file, [(adapted["files"]["a"], 1.0)], tmp_path / "merged.ckpt")
    with pytest.raises(UserError, match="must not be inside the --base folder"):
        merge.merge_checkpoint(tiny_model_dir, [(adapted["files"]["a"], 1.0)], tiny_model_dir / "merged")
    assert not (tiny_model_dir / "merged").exists()
    with pytest.raises(UserError, match="nope: no such file or folder"):
        merge.merge_checkpoint(tmp_path / "nope", [(adapted["files"]["a"], 1.0)], tmp_path / "o.safetensors")


def test_cli(base_file, adapted, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    a, b = adapted["files"]["a"], adapted["files"]["b"]
    assert main(["merge", "--base", str(base_file), "--lora", f"{a}:0.7", "--lora", f"{b}:-0.4", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    reference = tmp_path / "api.safetensors"
    merge.merge_checkpoint(base_file, lora_arguments(adapted), reference)
    got, expected = load_file(str(out)), load_file(str(reference))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # merging into a merged file keeps the earlier LoRAs in the record
    again = tmp_path / "again.safetensors"
    assert main(["merge", "--base", str(out), "--lora", str(a), "--out", str(again)]) == 0
    record = json.loads(checkpoint.read_metadata(again)[merge.METADATA_KEY])
    assert [(r["file"], r["ratio"]) for r in record] == [("a.safetensors", 0.7), ("b.safetensors", -0.4), ("a.safetensors", 1.0)]
    assert main(["merge", "--base", str(base_file), "--lora", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    assert "error: " in capsys.readouterr().err


def test_merges_what_the_exporter_writes(tiny_model_dir, base_file, tmp_path):
    """End to end with lora_offset.formats.kohya: conv LoRA with its own alpha (folded into lora_up) + TE."""
    export = pytest.importorskip("lora_offset.formats.kohya")
    from lora_offset.training.networks import add_lora

    unet, text_encoder = load_models(tiny_model_dir)
    add_lora(unet, unet_lora_config(rank=4, alpha=1.0, conv_rank=2, conv_alpha=2.0))
    add_lora(text_encoder, text_encoder_lora_config(rank=4, alpha=1.0))
    g = torch.Generator().manual_seed(3)
    for model in (unet, text_encoder):
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = 0.2 * torch.randn(p.shape, generator=g)
    lora = export.save_lora(tmp_path / "exported.safetensors", export.kohya_state_dict(unet, text_encoder), {}, precision="fp32")
    out = tmp_path / "merged.safetensors"
    merge.merge_checkpoint(base_file, [(lora, 1.0)], out)
    components = checkpoint.load_single_file(out, config_dir=tiny_model_dir)
    hidden, noise = model_outputs(components["unet"], components["text_encoder"])
    expected_hidden, expected_noise = model_outputs(unet.eval(), text_encoder.eval())
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(noise, expected_noise, rtol=1e-4, atol=1e-4)


def test_merge_keeps_the_base_files_own_names(base_file, adapted, tmp_path):
    """A file with the early CLIP layout (no `text_model.` level) is merged under its own names."""
    state = load_file(str(base_file))
    rename = lambda k: k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")  # noqa: E731
    old_base = tmp_path / "old.safetensors"
    save_file({rename(k): v for k, v in state.items()}, str(old_base))
    merge.merge_checkpoint(old_base, lora_arguments(adapted), tmp_path / "old-merged.safetensors")
    merge.merge_checkpoint(base_file, lora_arguments(adapted), tmp_path / "merged.safetensors")
    got, expected = load_file(str(tmp_path / "old-merged.safetensors")), load_file(str(tmp_path / "merged.safetensors"))
    assert set(got) == {rename(k) for k in expected}
    assert all(torch.equal(got[rename(k)], v) for k, v in expected.items())


def test_merge_reads_diffusers_files_too(base_file, adapted, tmp_path):
    """The same LoRA as a dotted diffusers file (no alpha: the scale sits in lora_B) merges the same."""
    kohya = read_adapter(adapted["files"]["a"], "merge")
    dotted = {}
    for m in kohya.modules.values():
        dotted[f"{m.component}.{m.path}.lora_A.weight"] = m.down.contiguous()
        dotted[f"{m.component}.{m.path}.lora_B.weight"] = (m.up * m.scale).contiguous()
    diffusers_file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(dotted, str(diffusers_file))
    merge.merge_checkpoint(base_file, [(diffusers_file, 0.7)], tmp_path / "from-diffusers.safetensors")
    merge.merge_checkpoint(base_file, [(adapted["files"]["a"], 0.7)], tmp_path / "from-kohya.safetensors")
    got, expected = load_file(str(tmp_path / "from-diffusers.safetensors")), load_file(str(tmp_path / "from-kohya.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
