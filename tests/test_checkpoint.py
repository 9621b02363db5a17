"""Single-file LDM checkpoints: the diffusers <-> LDM key map, reading, writing and loading."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_offset.errors import UserError
from lora_offset.formats import checkpoint, ldm
from lora_offset.sd15 import build_sd15


def load_folder_components(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
    }


@pytest.fixture(scope="module")
def tiny_ldm_file(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ldm") / "tiny.safetensors"
    ldm.save_ldm_checkpoint(load_folder_components(tiny_model_dir), path)
    return path


@pytest.fixture(scope="module")
def sd15_map():
    return ldm.ldm_key_map_for({name: build_sd15(name, device="meta") for name in ldm.COMPONENTS})


def outputs(components, seed=0):
    """UNet noise prediction, text-encoder hidden states and VAE decode for fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, components["text_encoder"].config.vocab_size - 2, (2, 77), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden = components["text_encoder"](tokens)[0]
        noise = components["unet"](latents, torch.tensor([10, 500]), encoder_hidden_states=hidden).sample
        image = components["vae"].decode(latents).sample
    return {"text": hidden, "unet": noise, "vae": image}


# ---------------------------------------------------------------------------------- key map


def test_sd15_upsamplers_sit_where_real_sd1_files_put_them(sd15_map):
    unet = sd15_map["unet"]
    p = "model.diffusion_model."
    # Up block 0 has no attention: its upsampler follows the resnet at .1; the others follow the attention at .2.
    assert unet["up_blocks.0.upsamplers.0.conv.weight"] == p + "output_blocks.2.1.conv.weight"
    assert unet["up_blocks.1.upsamplers.0.conv.weight"] == p + "output_blocks.5.2.conv.weight"
    assert unet["up_blocks.2.upsamplers.0.conv.bias"] == p + "output_blocks.8.2.conv.bias"
    assert "up_blocks.3.upsamplers.0.conv.weight" not in unet
    upsampler_keys = sorted(v for v in unet.values() if v.endswith(".conv.weight") and "output_blocks" in v)
    assert upsampler_keys == [p + "output_blocks.2.1.conv.weight", p + "output_blocks.5.2.conv.weight",
                              p + "output_blocks.8.2.conv.weight"]
    assert unet["down_blocks.0.downsamplers.0.conv.weight"] == p + "input_blocks.3.0.op.weight"
    assert unet["down_blocks.2.downsamplers.0.conv.weight"] == p + "input_blocks.9.0.op.weight"


def test_sd15_map_has_the_names_of_real_sd15_files(sd15_map):
    unet, vae, text = sd15_map["unet"], sd15_map["vae"], sd15_map["text_encoder"]
    p = "model.diffusion_model."
    assert (len(unet), len(vae), len(text)) == (686, 248, 196)
    assert unet["down_blocks.0.attentions.0.proj_in.weight"] == p + "input_blocks.1.1.proj_in.weight"
    assert unet["down_blocks.1.resnets.0.conv_shortcut.weight"] == p + "input_blocks.4.0.skip_connection.weight"
    assert unet["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert unet["mid_block.resnets.1.time_emb_proj.weight"] == p + "middle_block.2.emb_layers.1.weight"
    assert unet["up_blocks.3.resnets.2.conv_shortcut.weight"] == p + "output_blocks.11.0.skip_connection.weight"
    assert unet["up_blocks.3.attentions.2.proj_out.weight"] == p + "output_blocks.11.1.proj_out.weight"
    assert unet["conv_norm_out.weight"] == p + "out.0.weight"
    assert unet["time_embedding.linear_2.weight"] == p + "time_embed.2.weight"
    assert vae["decoder.up_blocks.0.resnets.0.conv1.weight"] == "first_stage_model.decoder.up.3.block.0.conv1.weight"
    assert vae["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "first_stage_model.decoder.up.3.upsample.conv.weight"
    assert vae["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"
    assert vae["encoder.mid_block.attentions.0.to_out.0.weight"] == "first_stage_model.encoder.mid.attn_1.proj_out.weight"
    assert vae["decoder.mid_block.resnets.1.norm2.bias"] == "first_stage_model.decoder.mid.block_2.norm2.bias"
    assert text["encoder.layers.11.mlp.fc2.weight"] == "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
    assert text["final_layer_norm.bias"] == "cond_stage_model.transformer.text_model.final_layer_norm.bias"


def test_map_is_one_to_one_and_agrees_with_diffusers_converter(sd15_map):
    ldm_keys = [k for m in sd15_map.values() for k in m.values()]
    assert len(ldm_keys) == len(set(ldm_keys))
    shapes = {}
    vae_model = build_sd15("vae", device="meta")
    for component, model in (("unet", build_sd15("unet")), ("vae", vae_model), ("text_encoder", build_sd15("text_encoder"))):
        for k, v in model.state_dict().items():
            shape = tuple(v.shape)
            if component == "vae" and v.ndim == 2:
                shape += (1, 1)
            shapes[sd15_map[component][k]] = shape
    derived = ldm.derive_ldm_map(shapes, build_sd15("unet").config, vae_model.config)
    assert derived == sd15_map


def test_a_wrong_proposal_is_caught_by_the_converter_check(monkeypatch):
    """The check is real: an attention put in the resnet's slot (.0) no longer reads back.

    (It cannot catch everything: diffusers also reads an upsampler at output_blocks.N.1 or .2 of
    any layer, hence the pinned SD 1.5 names above.)
    """
    original = ldm.propose_ldm_unet_key

    def misplaced(key, layers_per_block, with_attention):
        ldm = original(key, layers_per_block, with_attention)
        return ldm.replace("input_blocks.4.1.", "input_blocks.4.2.") if key.startswith("down_blocks.1.attentions.0.") else ldm

    monkeypatch.setattr(ldm, "propose_ldm_unet_key", misplaced)
    with pytest.raises(RuntimeError, match="disagrees with diffusers' converter"):
        ldm.ldm_key_map_for({name: build_sd15(name, device="meta") for name in ldm.COMPONENTS})


# ---------------------------------------------------------------------------------- round trip


def test_tiny_round_trip_through_diffusers_from_single_file(tiny_model_dir, tiny_ldm_file):
    from diffusers import StableDiffusionPipeline

    original = load_folder_components(tiny_model_dir)
    pipe = StableDiffusionPipeline.from_single_file(str(tiny_ldm_file), config=str(tiny_model_dir), local_files_only=True)
    loaded = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    for name in ldm.COMPONENTS:
        a, b = original[name].state_dict(), loaded[name].state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    expected, got = outputs(original), outputs(loaded)
    for name in expected:  # same weights; the pipeline may pick another attention kernel: fp tolerance
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ldm_file_keys_dtypes_and_vae_attention_shapes(tiny_ldm_file):
    state = load_file(str(tiny_ldm_file))
    assert len(state) == 684 + 244 + 196 + 1
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert torch.equal(state["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])
    assert state["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (64, 64, 3, 3)
    assert {v.dtype for k, v in state.items() if "position_ids" not in k} == {torch.float32}
    assert checkpoint.detect_model_family(state) == "sd1"


def test_load_single_file_gives_the_same_model(tiny_model_dir, tiny_ldm_file):
    original = load_folder_components(tiny_model_dir)
    components = checkpoint.load_single_file(tiny_ldm_file, config_dir=tiny_model_dir)
    assert set(components) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    for name in ldm.COMPONENTS:
        a, b = original[name].state_dict(), components[name].state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
        assert all(p.device.type == "cpu" for p in components[name].parameters())
    expected, got = outputs(original), outputs(components)
    for name in expected:  # identical weights; memory layout can change the float summation order
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert components["tokenizer"]("a dog").input_ids[0] == components["tokenizer"].bos_token_id
    assert type(components["scheduler"]).__name__ == "PNDMScheduler"


def test_fp16_file_round_trips_and_loads_as_fp32(tiny_model_dir, tmp_path):
    original = load_folder_components(tiny_model_dir)
    path = ldm.save_ldm_checkpoint(original, tmp_path / "half.safetensors", dtype=torch.float16)
    state = load_file(str(path))
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dtype == torch.float16
    components = checkpoint.load_single_file(path, config_dir=tiny_model_dir)
    w = components["unet"].down_blocks[0].attentions[0].proj_in.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, original["unet"].down_blocks[0].attentions[0].proj_in.weight.half().float())


def test_config_that_does_not_match_the_file_is_a_user_error(tiny_ldm_file):
    with pytest.raises(UserError, match=r"tiny\.safetensors: unet .*(config|configs in) .*sd15"):
        checkpoint.load_single_file(tiny_ldm_file)  # SD 1.5's full-size configs


def test_tokenizer_comes_from_the_option_the_config_dir_clip_or_the_local_cache(tiny_model_dir, tiny_ldm_file, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from lora_offset.formats import clip_tokenizer

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    config_dir = tmp_path / "configs"  # configs only: no tokenizer/, no weights
    shutil.copytree(tiny_model_dir, config_dir, ignore=shutil.ignore_patterns("tokenizer", "*.safetensors"))
    # No folder given: SD 1.x's CLIP tokenizer is built, and its 49408 tokens do not fit the tiny model.
    with pytest.raises(UserError, match=r"tiny\.safetensors: the tokenizer has 49408 tokens but the text encoder "
                                        r".* has 514; set model\.tokenizer"):
        checkpoint.load_single_file(tiny_ldm_file, config_dir=config_dir)
    with pytest.raises(UserError, match="no vocab.json and merges.txt"):
        checkpoint.load_single_file(tiny_ldm_file, config_dir=config_dir, tokenizer=tmp_path)
    components = checkpoint.load_single_file(tiny_ldm_file, config_dir=config_dir, tokenizer=tiny_model_dir / "tokenizer")
    assert len(components["tokenizer"]) == 514
    # Without openai-clip: the local Hugging Face cache, else one error naming both ways out.
    monkeypatch.setattr(clip_tokenizer, "find_clip_bpe_file", lambda: None)
    with pytest.raises(UserError, match=r'pip install "openai-clip==1\.0\.1"\) or set model\.tokenizer = "<folder>"'):
        checkpoint.load_single_file(tiny_ldm_file, config_dir=config_dir)
    # A Hugging Face cache entry for openai/clip-vit-large-patch14 (here: the tiny tokenizer's files).
    repo = cache / "models--openai--clip-vit-large-patch14"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_model_dir / "tokenizer", repo / "snapshots" / ("0" * 40))
    components = checkpoint.load_single_file(tiny_ldm_file, config_dir=config_dir)
    assert len(components["tokenizer"]) == 514


def test_single_file_needs_no_tokenizer_folder(tiny_model_dir, tmp_path):
    """A file whose text encoder has CLIP ViT-L/14's vocabulary (as every SD 1.x file) loads with no tokenizer folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config_dir = tmp_path / "configs"
    shutil.copytree(tiny_model_dir, config_dir, ignore=shutil.ignore_patterns("tokenizer", "*.safetensors"))
    te_config = json.loads((config_dir / "text_encoder" / "config.json").read_text())
    te_config.update(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    (config_dir / "text_encoder" / "config.json").write_text(json.dumps(te_config))
    components = load_folder_components(tiny_model_dir)
    torch.manual_seed(0)
    components["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    path = ldm.save_ldm_checkpoint(components, tmp_path / "model.safetensors")

    loaded = checkpoint.load_single_file(path, config_dir=config_dir)
    tokenizer = loaded["tokenizer"]
    assert type(tokenizer).__name__ == "CLIPTokenizer" and len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    ids = tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    # openai/clip-vit-large-patch14's ids: <|startoftext|> a photo of sks dog <|endoftext|>, padded with <|endoftext|>
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert (ids[0, 7:] == 49407).all()
    with torch.no_grad():
        assert loaded["text_encoder"](ids)[0].shape == (1, 77, te_config["hidden_size"])


# ---------------------------------------------------------------------------------- families


def test_detect_model_family():
    p = "model.diffusion_model."
    sd1 = {p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
           "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
    assert checkpoint.detect_model_family(sd1) == "sd1"
    assert checkpoint.detect_model_family(list(sd1)) == "sd1"
    sd2_unet_only = {p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    assert checkpoint.detect_model_family(sd2_unet_only) == "sd2"
    assert checkpoint.detect_model_family([p + "input_blocks.1.1.proj_in.weight",
                                           "cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]) == "sd2"
    assert checkpoint.detect_model_family(["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                                           p + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]) == "sdxl"
    assert checkpoint.detect_model_family([p + "label_emb.0.0.weight"]) == "sdxl"
    assert checkpoint.detect_model_family(["lora_unet_x.lora_down.weight"]) == "unknown"


@pytest.mark.parametrize("keys, message", [
    (["conditioner.embedders.1.model.positional_embedding"], "is an SDXL checkpoint; lora-offset trains SD 1.x only"),
    (["cond_stage_model.model.token_embedding.weight"], "is an SD 2.x checkpoint; lora-offset trains SD 1.x only"),
    (["down_blocks.0.attentions.0.proj_in.weight"], "is not an SD 1.x checkpoint"),
])
def test_require_sd1_names_the_file(keys, message):
    with pytest.raises(UserError, match="^model.safetensors: " + message):
        checkpoint.require_sd1(keys, "model.safetensors")


def test_load_single_file_refuses_sdxl(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="xl.safetensors: is an SDXL checkpoint"):
        checkpoint.load_single_file(path)


# ---------------------------------------------------------------------------------- reading


def test_read_state_dict_errors_name_the_file(tmp_path, tiny_ldm_file):
    with pytest.raises(UserError, match="nope.safetensors: no such file"):
        checkpoint.read_state_dict(tmp_path / "nope.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_ldm_file.read_bytes()[:50_000])
    with pytest.raises(UserError, match="truncated.safetensors: .*truncated or corrupt"):
        checkpoint.read_state_dict(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    with pytest.raises(UserError, match="garbage.safetensors"):
        checkpoint.read_state_dict(garbage)
    with pytest.raises(UserError, match="garbage.safetensors"):
        checkpoint.read_metadata(garbage)


def test_pickled_checkpoint_needs_the_opt_in_and_unwraps_state_dict(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a.weight": torch.ones(2, 3)}, "global_step": 7}, path)
    with pytest.raises(UserError) as e:
        checkpoint.read_state_dict(path)
    assert str(path) in str(e.value) and "--allow-pickle" in str(e.value) and "model.allow_pickle = true" in str(e.value)
    state = checkpoint.read_state_dict(path, allow_pickle=True)
    assert list(state) == ["a.weight"] and torch.equal(state["a.weight"], torch.ones(2, 3))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated.ckpt"):
        checkpoint.read_state_dict(truncated, allow_pickle=True)


def test_metadata_is_written(tiny_model_dir, tmp_path):
    path = ldm.save_ldm_checkpoint(load_folder_components(tiny_model_dir), tmp_path / "m.safetensors",
                                          metadata={"note": json.dumps({"x": 1})})
    assert checkpoint.read_metadata(path) == {"format": "pt", "note": '{"x": 1}'}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_load_single_file_vae_accepts_ldm_and_diffusers_keys(tiny_model_dir, tiny_ldm_file, tmp_path):
    from diffusers import AutoencoderKL

    original = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").state_dict()
    full = load_file(str(tiny_ldm_file))
    bare = tmp_path / "vae.safetensors"  # how stand-alone VAE files (vae-ft-mse-...) are keyed
    save_file({k.removeprefix("first_stage_model."): v for k, v in full.items() if k.startswith("first_stage_model.")}, str(bare))
    diffusers_file = tmp_path / "vae-diffusers.safetensors"
    save_file(original, str(diffusers_file))
    for source in (tiny_ldm_file, bare, diffusers_file):
        vae = checkpoint.load_single_file_vae(source, config_dir=tiny_model_dir)
        loaded = vae.state_dict()
        assert set(loaded) == set(original) and all(torch.equal(loaded[k], original[k]) for k in original), source
    with pytest.raises(UserError, match=r"vae\.safetensors: vae .*(config|configs in) .*sd15"):
        checkpoint.load_single_file_vae(bare)  # SD 1.5's full-size VAE config
    lora = tmp_path / "not-a-vae.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 2)}, str(lora))
    with pytest.raises(UserError, match="not-a-vae.safetensors: vae weights missing"):
        checkpoint.load_single_file_vae(lora, config_dir=tiny_model_dir)


def test_old_text_encoder_layout_without_text_model_level_loads(tiny_model_dir, tiny_ldm_file, tmp_path):
    """Some early SD 1.x files name CLIP `cond_stage_model.transformer.encoder...` (A1111 renames on load)."""
    state = load_file(str(tiny_ldm_file))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in state.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    original = load_folder_components(tiny_model_dir)["text_encoder"].state_dict()
    loaded = checkpoint.load_single_file(path, config_dir=tiny_model_dir)["text_encoder"].state_dict()
    assert set(loaded) == set(original) and all(torch.equal(loaded[k], original[k]) for k in original)
