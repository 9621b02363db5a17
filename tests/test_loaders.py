"""Loader compatibility suite: every module of our files applies in every loader, on the tiny model
and on full-size SD 1.5 names; deliberately broken files are caught (the oracles say what each
loader would really do with them); the diffusers oracle agrees with diffusers' real loader."""

from __future__ import annotations

import re

import pytest
import torch

from lora_offset.formats import loaders
from lora_offset.formats.keys import kohya_name, normalize_text_encoder_name
from lora_offset.training.network_targets import (TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS,
                                                  UNET_CONV_3X3_TARGETS, UNET_CONV_RANK_TARGETS)
from lora_offset.training.networks import add_lora, lora_module_names, text_encoder_lora_config, unet_lora_config

LOADER_NAMES = list(loaders.LOADERS)
VARIANTS = ("unet", "unet+te", "unet+te+conv")


def lora_components(variant: str, seed: int = 0) -> dict:
    """Tiny components with PEFT LoRA injected as the trainer does it (random non-zero lora_B)."""
    from lora_offset.tiny import build_tiny_components

    c = build_tiny_components(seed=seed)
    conv = variant.endswith("conv")
    add_lora(c["unet"], unet_lora_config(4, 2.0, conv_rank=2 if conv else 0, conv_alpha=1.0))
    if "te" in variant:
        add_lora(c["text_encoder"], text_encoder_lora_config(4, 2.0))
    torch.manual_seed(seed + 1)
    for model in (c["unet"], c["text_encoder"]):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    return c


def exported_state_dict(c: dict, variant: str) -> dict[str, torch.Tensor]:
    """Our exporter's kohya state dict for the injected components."""
    from lora_offset.formats.kohya import kohya_state_dict

    return kohya_state_dict(c["unet"], c["text_encoder"] if "te" in variant else None)


def expected_modules(unet_names, te_names) -> set[str]:
    return {f"unet.{n}" for n in unet_names} | {f"text_encoder.{normalize_text_encoder_name(n)}" for n in te_names}


def kohya_keys(unet_names, te_names, alpha: bool = True) -> set[str]:
    """The exporter's naming (lora_offset.formats.keys) for the given module paths."""
    suffixes = ("lora_down.weight", "lora_up.weight") + (("alpha",) if alpha else ())
    modules = [kohya_name("lora_unet", n) for n in unet_names] + [kohya_name("lora_te", n) for n in te_names]
    return {f"{m}.{s}" for m in modules for s in suffixes}


def target_names(module_names, variant: str, component: str) -> list[str]:
    """Module names networks.py's PEFT targets select (PEFT full-matches each pattern against each name)."""
    if component == "text_encoder":
        pattern = TEXT_ENCODER_TARGETS if "te" in variant else r"(?!)"
    elif variant.endswith("conv"):
        pattern = f"({UNET_ATTENTION_TARGETS}|{UNET_CONV_3X3_TARGETS}|{UNET_CONV_RANK_TARGETS})"
    else:
        pattern = UNET_ATTENTION_TARGETS
    return [n for n in module_names if re.fullmatch(pattern, n)]


@pytest.fixture(scope="module", params=VARIANTS)
def tiny_export(request):
    variant = request.param
    c = lora_components(variant)
    sd = exported_state_dict(c, variant)
    unet_names = lora_module_names(c["unet"])
    te_names = lora_module_names(c["text_encoder"]) if "te" in variant else []
    return variant, c, sd, expected_modules(unet_names, te_names)


@pytest.fixture(scope="module")
def sd15_modules():
    from lora_offset.sd15 import build_sd15

    unet = [n for n, _ in build_sd15("unet").named_modules()]
    te = [n for n, _ in build_sd15("text_encoder").named_modules()]
    return unet, te


# --------------------------------------------------------------------------- the name maps

def test_ldm_map_is_proven_by_diffusers_converter_on_sd15_and_tiny(tiny_components):
    from lora_offset.sd15 import build_sd15

    loaders.check_unet_ldm_map(build_sd15("unet"), loaders.sd15_model_names().unet_ldm)
    loaders.check_unet_ldm_map(tiny_components["unet"], loaders.tiny_model_names().unet_ldm)


def test_ldm_map_pins_sd1_upsampler_and_block_positions():
    ldm = loaders.sd15_model_names().unet_ldm
    # Real SD 1.x files: output_blocks.2 has no attention, so its upsampler sits at .1; the others at .2.
    assert ldm["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert ldm["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert ldm["up_blocks.2.upsamplers.0.conv"] == "output_blocks.8.2.conv"
    assert ldm["down_blocks.2.downsamplers.0.conv"] == "input_blocks.9.0.op"
    assert ldm["down_blocks.1.attentions.1.proj_in"] == "input_blocks.5.1.proj_in"
    assert ldm["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    assert ldm["up_blocks.3.resnets.2.conv_shortcut"] == "output_blocks.11.0.skip_connection"
    assert ldm["conv_in"] == "input_blocks.0.0" and ldm["time_embedding.linear_2"] == "time_embed.2"
    assert len(ldm) == len(set(ldm.values())) == 391


def test_a1111_regexes_agree_with_diffusers_converter_for_every_sd15_module():
    names = loaders.sd15_model_names()
    no_rule = set()
    for d, ldm in names.unet_ldm.items():
        converted = loaders.a1111_convert_name(kohya_name("lora_unet", d))
        if converted.startswith("lora_unet"):
            no_rule.add(d)
            continue
        assert converted == "diffusion_model_" + ldm.replace(".", "_"), d
    assert no_rule == {"conv_norm_out"}  # a GroupNorm no LoRA targets


def test_tiny_names_equal_sd15_names():
    # The tiny model exists so that every key test also holds for SD 1.5.
    # Only difference: SD 1.5 widens 640 -> 1280 in down block 2, the tiny UNet keeps 64 channels, so
    # it has no conv_shortcut there.
    tiny, full = loaders.tiny_model_names(), loaders.sd15_model_names()
    missing = set(full.unet_ldm) - set(tiny.unet_ldm)
    assert missing == {"down_blocks.2.resnets.0.conv_shortcut"} and set(tiny.unet_ldm) < set(full.unet_ldm)
    assert all(full.unet_ldm[d] == ldm for d, ldm in tiny.unet_ldm.items())
    assert tiny.text_encoder == full.text_encoder


# --------------------------------------------------------------------------- our files load everywhere

@pytest.mark.parametrize("loader", LOADER_NAMES)
def test_every_exported_module_applies_on_tiny(tiny_export, loader):
    variant, _, sd, expected = tiny_export
    result = loaders.match(loader, sd.keys(), loaders.tiny_model_names())
    assert not result.whole_lora_rejected, result.reason
    assert result.ignored_keys == []
    assert result.missing_alpha == []
    assert result.applied_modules == expected
    assert result.ok
    counts = (sum(m.startswith("unet.") for m in expected), sum(m.startswith("text_encoder.") for m in expected))
    # The tiny UNet lacks one conv_shortcut of SD 1.5 (its down block 2 keeps 64 channels): 277, not 278.
    assert counts == {"unet": (192, 0), "unet+te": (192, 72), "unet+te+conv": (277, 72)}[variant]
    assert loaders.file_modules(sd.keys(), loaders.tiny_model_names()) == expected


def test_tiny_targets_are_what_peft_injects(tiny_export, sd15_modules):
    """The regex shortcut used for SD 1.5 below selects exactly the modules PEFT LoRA'd on the tiny model."""
    variant, c, _, expected = tiny_export
    from lora_offset.tiny import build_tiny_components

    plain = build_tiny_components(seed=0)
    unet = target_names([n for n, _ in plain["unet"].named_modules()], variant, "unet")
    te = target_names([n for n, _ in plain["text_encoder"].named_modules()], variant, "text_encoder")
    assert expected_modules(unet, te) == expected


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("loader", LOADER_NAMES)
def test_every_module_applies_on_sd15_names(sd15_modules, variant, loader):
    unet = target_names(sd15_modules[0], variant, "unet")
    te = target_names(sd15_modules[1], variant, "text_encoder")
    counts = (len(unet), len(te))
    assert counts == {"unet": (192, 0), "unet+te": (192, 72), "unet+te+conv": (278, 72)}[variant]
    result = loaders.match(loader, kohya_keys(unet, te), loaders.sd15_model_names())
    assert result.ok, (result.reason, result.ignored_keys[:3], result.missing_alpha[:3])
    assert result.applied_modules == expected_modules(unet, te)


# --------------------------------------------------------------------------- broken files are caught

@pytest.fixture(scope="module")
def sd15_attention_te(sd15_modules):
    return target_names(sd15_modules[0], "unet+te", "unet"), target_names(sd15_modules[1], "unet+te", "text_encoder")


@pytest.mark.parametrize("loader", LOADER_NAMES)
def test_missing_alpha_is_flagged_in_every_loader(sd15_attention_te, loader):
    unet, te = sd15_attention_te
    result = loaders.match(loader, kohya_keys(unet, te, alpha=False), loaders.sd15_model_names())
    # Every loader still applies every module, but at scale 1.0 instead of alpha/rank: silently wrong.
    assert result.applied_modules == expected_modules(unet, te)
    assert sorted(result.missing_alpha) == sorted(expected_modules(unet, te))
    assert not result.ok


def dotted_diffusers_keys(unet, te) -> set[str]:
    out = set()
    for prefix, names in (("unet", unet), ("text_encoder", [normalize_text_encoder_name(n) for n in te])):
        for n in names:
            out |= {f"{prefix}.{n}.lora_A.weight", f"{prefix}.{n}.lora_B.weight"}
    return out


def test_dotted_diffusers_keys_fail_in_every_kohya_loader(sd15_attention_te):
    unet, te = sd15_attention_te
    keys = dotted_diffusers_keys(unet, te)
    names = loaders.sd15_model_names()
    r = loaders.match_all(keys, names)
    # A1111: module = text before the first ".", i.e. "unet": nothing matches, the LoRA silently does nothing.
    assert r["a1111"].applied_modules == set() and len(r["a1111"].ignored_keys) == len(keys)
    assert not r["a1111"].whole_lora_rejected and not r["a1111"].ok
    # ComfyUI knows dotted "unet." names only in the old attn-processor spelling: the 128 attention
    # projections are dropped with a warning, proj_in/proj_out/ff (64) and the text encoder (72) apply.
    attention = {f"unet.{n}" for n in unet if re.search(r"attn[12]\.to_", n)}
    assert len(attention) == 128
    assert r["comfyui"].applied_modules == expected_modules(unet, te) - attention
    assert len(r["comfyui"].ignored_keys) == 2 * 128 and not r["comfyui"].ok
    # Forge: the same 256 unmatched keys are more than 12: the whole LoRA is skipped.
    assert r["forge"].whole_lora_rejected and "12" in r["forge"].reason
    # InvokeAI: no kohya probe key, so it cannot even tell the base model.
    assert r["invokeai"].whole_lora_rejected
    # diffusers reads its own format.
    assert r["diffusers"].applied_modules == expected_modules(unet, te) and r["diffusers"].ignored_keys == []


def test_text_encoder_keys_without_text_model_fail(sd15_attention_te):
    unet, te = sd15_attention_te
    keys = kohya_keys(unet, [])
    bad_te = {f"lora_te_{n.replace('.', '_')}.{s}" for n in te for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(k.startswith("lora_te_encoder_layers_") for k in bad_te)
    keys |= bad_te
    r = loaders.match_all(keys, loaders.sd15_model_names())
    unet_only = expected_modules(unet, [])
    for loader in ("a1111", "comfyui"):  # text encoder silently (A1111) or with warnings (ComfyUI) untouched
        assert r[loader].applied_modules == unet_only and sorted(r[loader].ignored_keys) == sorted(bad_te)
        assert not r[loader].ok
    assert r["forge"].whole_lora_rejected  # 216 unmatched keys > 12
    assert r["invokeai"].whole_lora_rejected  # lora_te_encoder... resolves to no CLIPTextModel submodule
    assert "text_encoder" in r["invokeai"].reason or "resolves" in r["invokeai"].reason
    # diffusers strips "text_model." when transformers 5's CLIPTextModel lacks it, so it copes.
    assert r["diffusers"].ok


def test_orphan_alpha_rejects_whole_file_in_a1111_invokeai_and_diffusers(sd15_attention_te):
    unet, te = sd15_attention_te
    keys = kohya_keys(unet, te) | {"lora_unet_down_blocks_0_attentions_0_norm.alpha"}
    r = loaders.match_all(keys, loaders.sd15_model_names())
    assert r["a1111"].whole_lora_rejected and r["invokeai"].whole_lora_rejected and r["diffusers"].whole_lora_rejected
    # ComfyUI and Forge count the alpha as loaded and apply everything.
    assert r["comfyui"].ok and r["forge"].ok


def test_forge_tolerates_up_to_12_unmatched_keys(sd15_attention_te):
    unet, _ = sd15_attention_te
    base = kohya_keys(unet, [])
    junk = {f"lora_unet_nonexistent_{i}.lora_down.weight" for i in range(12)}
    assert not loaders.match_forge(base | junk, loaders.sd15_model_names()).whole_lora_rejected
    junk.add("lora_unet_nonexistent_12.lora_down.weight")
    assert loaders.match_forge(base | junk, loaders.sd15_model_names()).whole_lora_rejected


def test_lora_te1_prefix_and_ldm_style_names():
    names = loaders.sd15_model_names()
    # q_proj and out_proj: diffusers needs an out_proj key to read text-encoder keys (see the quirk test).
    te1 = {f"lora_te1_text_model_encoder_layers_0_self_attn_{m}.{s}" for m in ("q_proj", "out_proj")
           for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    ldm = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight", "lora_unet_input_blocks_1_1_proj_in.lora_up.weight",
           "lora_unet_input_blocks_1_1_proj_in.alpha",
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha"}
    q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    for loader in ("a1111", "comfyui", "forge", "diffusers"):
        assert q in loaders.match(loader, te1 | ldm - {k for k in ldm if "input_blocks" in k}, names).applied_modules, loader
    # LDM-style kohya names: A1111 (lora_unet -> diffusion_model fallback) and ComfyUI map them; InvokeAI cannot.
    for loader in ("a1111", "comfyui"):
        assert "unet.down_blocks.0.attentions.0.proj_in" in loaders.match(loader, ldm, names).applied_modules
    assert loaders.match_invokeai(ldm, names).whole_lora_rejected
    # InvokeAI applies SD 1.x text encoders only under "lora_te_": lora_te1_ keys are skipped silently.
    r = loaders.match_invokeai(te1 | ldm - {k for k in ldm if "input_blocks" in k}, names)
    assert q not in r.applied_modules and sorted(te1) == r.ignored_keys


def test_invokeai_probe_checks_token_width_when_shapes_given(sd15_attention_te):
    unet, _ = sd15_attention_te
    keys = kohya_keys(unet, [])
    probes = [k for k in keys if re.search(r"_attn2_to_[kv]\.lora_down", k)]
    assert len(probes) == 32
    names = loaders.sd15_model_names()
    assert loaders.match_invokeai(keys, names, shapes={p: (8, 768) for p in probes}).ok
    result = loaders.match_invokeai(keys, names, shapes={p: (8, 1024) for p in probes})
    assert result.whole_lora_rejected and "1024" in result.reason


def test_dotted_file_with_kohya_keys_mixed_in_drops_them_in_diffusers(sd15_attention_te):
    unet, _ = sd15_attention_te
    keys = dotted_diffusers_keys(unet[:10], []) | kohya_keys(unet[10:20], [])
    r = loaders.match_diffusers(keys, loaders.sd15_model_names())
    assert r.applied_modules == expected_modules(unet[:10], [])
    assert r.ignored_keys == sorted(kohya_keys(unet[10:20], []))


# --------------------------------------------------------------------------- against diffusers itself

def _lora_modules_after_real_load(tiny_model_dir, state_dict):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights({k: v.clone() for k, v in state_dict.items()})
    return expected_modules(lora_module_names(pipe.unet), lora_module_names(pipe.text_encoder))


def test_diffusers_oracle_agrees_with_real_load_lora_weights(tiny_model_dir):
    variant = "unet+te+conv"
    c = lora_components(variant)
    sd = exported_state_dict(c, variant)
    applied = _lora_modules_after_real_load(tiny_model_dir, sd)
    assert applied == loaders.match_diffusers(sd.keys(), loaders.tiny_model_names()).applied_modules
    assert len(applied) == len({k.split(".")[0] for k in sd})

    # A broken file: an orphan alpha. The oracle says diffusers refuses it; diffusers does.
    broken = dict(sd)
    broken["lora_unet_down_blocks_0_attentions_0_norm.alpha"] = torch.tensor(1.0)
    assert loaders.match_diffusers(broken.keys(), loaders.tiny_model_names()).whole_lora_rejected
    with pytest.raises(ValueError, match="not been correctly renamed"):
        _lora_modules_after_real_load(tiny_model_dir, broken)

    # A dotted file with kohya keys mixed in: diffusers drops the kohya keys without a word.
    dotted = {}
    for key, value in sd.items():
        module, _, suffix = key.partition(".")
        if module.startswith("lora_unet_down_blocks_0") and suffix != "alpha":
            path = next(n for n in loaders.tiny_model_names().unet if kohya_name("lora_unet", n) == module)
            dotted[f"unet.{path}.{'lora_A' if suffix.startswith('lora_down') else 'lora_B'}.weight"] = value
    kohya_part = {k: v for k, v in sd.items() if k.startswith("lora_unet_up_blocks_3")}
    mixed = {**dotted, **kohya_part}
    oracle = loaders.match_diffusers(mixed.keys(), loaders.tiny_model_names())
    assert oracle.ignored_keys == sorted(kohya_part)
    assert _lora_modules_after_real_load(tiny_model_dir, mixed) == oracle.applied_modules


def test_cached_sd15_names_equal_a_fresh_build(tmp_path, monkeypatch):
    fresh = loaders.sd15_model_names(use_cache=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = loaders.names._cached_names("sd15", lambda: fresh)  # writes the cache
    assert list(tmp_path.rglob("sd15-names-*.json"))
    cached = loaders.names._cached_names("sd15", lambda: pytest.fail("the cache was not read"))
    for names in (built, cached, loaders.sd15_model_names()):
        assert names.to_json() == fresh.to_json()
    # diffusers' kohya converter resolves every diffusers-style UNet name and both CLIP spellings.
    assert sum(v.startswith("unet.") for v in fresh.diffusers_kohya.values()) >= 391 - 1
    assert fresh.diffusers_kohya["lora_te_text_model_encoder_layers_0_mlp_fc1"] == "text_encoder.text_model.encoder.layers.0.mlp.fc1"


@pytest.mark.parametrize("key, expected", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", ("unet", "down_blocks.0.attentions.0.proj_in", "down", "kohya")),
    ("lora_unet_input_blocks_1_1_proj_in.alpha", ("unet", "down_blocks.0.attentions.0.proj_in", "alpha", "kohya-ldm")),
    ("lora_te1_text_model_encoder_layers_3_mlp_fc2.lora_up.weight", ("text_encoder", "text_model.encoder.layers.3.mlp.fc2", "up", "kohya-te1")),
    ("lora_te_encoder_layers_3_mlp_fc2.alpha", ("text_encoder", "text_model.encoder.layers.3.mlp.fc2", "alpha", "kohya-no-text_model")),
    ("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0.lora_B.weight",
     ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0", "up", "diffusers")),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight",
     ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_k", "down", "diffusers")),
    ("text_encoder.encoder.layers.0.self_attn.out_proj.lora_A.weight",
     ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj", "down", "diffusers")),
    ("base_model.model.down_blocks.1.resnets.0.conv1.lora_A.weight", ("unet", "down_blocks.1.resnets.0.conv1", "down", "peft")),
    ("lora_unet_nothing_here.alpha", None),
    ("unet.down_blocks.9.resnets.0.conv1.lora_A.weight", None),
])
def test_parse_key_reads_every_naming(key, expected):
    parsed = loaders.parse_key(key, loaders.sd15_model_names())
    assert (parsed and (parsed.component, parsed.module, parsed.role, parsed.style)) == expected


def test_diffusers_drops_text_encoder_qkv_without_out_proj(tiny_model_dir):
    """diffusers guesses the text-encoder key format from an out_proj LoRA; the oracle knows, and agrees."""
    variant = "unet+te"
    sd = exported_state_dict(lora_components(variant), variant)
    partial = {k: v for k, v in sd.items() if not re.search(r"lora_te_.*_self_attn_out_proj\.", k)}
    oracle = loaders.match_diffusers(partial.keys(), loaders.tiny_model_names())
    qkv = [m for m in expected_modules([], lora_module_names(lora_components(variant)["text_encoder"]))
           if re.search(r"[qkv]_proj$", m)]
    assert len(qkv) == 36 and not (set(qkv) & oracle.applied_modules) and len(oracle.ignored_keys) == 3 * 36
    assert _lora_modules_after_real_load(tiny_model_dir, partial) == oracle.applied_modules
    # Attention keys only, no MLP: diffusers cannot tell the format and raises.
    attention_only = {k: v for k, v in partial.items() if "_mlp_" not in k}
    assert loaders.match_diffusers(attention_only.keys(), loaders.tiny_model_names()).whole_lora_rejected
    with pytest.raises(ValueError, match="infer state dict type"):
        _lora_modules_after_real_load(tiny_model_dir, attention_only)
    # The kohya loaders have no such quirk.
    assert loaders.match_a1111(attention_only.keys(), loaders.tiny_model_names()).ok
