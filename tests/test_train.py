"""End-to-end training on a tiny SD 1.x-topology model, on CPU, through the real command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import toml
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_offset.cli import main


def make_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        level = rng.uniform(0, 255)
        pixels = np.clip(rng.normal(level, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def write_config(tmp_path: Path, model_dir: Path, images: Path, **sections) -> Path:
    config = {
        "model": {"pretrained": str(model_dir)},
        "network": {"rank": 4, "alpha": 1.0},
        "training": {"output_dir": str(tmp_path / "out"), "output_name": "tiny", "max_steps": 3,
                     "mixed_precision": "no", "learning_rate": 1e-3, "seed": 0, "save_precision": "fp32"},
        "dataset": {"resolution": 64, "batch_size": 2,
                    "subsets": [{"image_dir": str(images), "class_tokens": "sks dog"}]},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(toml.dumps(config), encoding="utf-8")
    return path


def module_names(path: Path) -> dict[str, set[str]]:
    """{kohya module: {suffixes}} of a LoRA file."""
    modules: dict[str, set[str]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            module, _, suffix = key.partition(".")
            modules.setdefault(module, set()).add(suffix)
    return modules


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "10_sks dog", 4)


def test_train_cli_unet_only_exports_192_kohya_modules(tmp_path, tiny_model_dir, images, capsys):
    config = write_config(tmp_path, tiny_model_dir, images,
                          training={"optimizer": "adamw8bit", "gradient_checkpointing": True})
    assert main(["train", "--config", str(config)]) == 0
    adapter = tmp_path / "out" / "tiny.safetensors"
    assert f"saved {adapter}" in capsys.readouterr().out
    modules = module_names(adapter)
    assert len(modules) == 192
    assert all(m.startswith("lora_unet_") for m in modules)
    assert all(s == {"lora_down.weight", "lora_up.weight", "alpha"} for s in modules.values())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    with safe_open(str(adapter), "pt") as f:
        meta = f.metadata()
        assert float(f.get_tensor("lora_unet_mid_block_attentions_0_proj_in.alpha")) == 1.0
    assert meta["ss_steps"] == "3"
    assert meta["ss_noise_offset"] == "0.1"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 1.0
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (tmp_path / "out" / "logs").is_dir()  # TensorBoard event files


def test_train_with_text_encoder_exports_264_modules(tmp_path, tiny_model_dir, images):
    config = write_config(tmp_path, tiny_model_dir, images, network={"train_text_encoder": True},
                          training={"max_steps": 2, "text_encoder_lr": 5e-4})
    assert main(["train", "--config", str(config)]) == 0
    modules = module_names(tmp_path / "out" / "tiny.safetensors")
    assert len(modules) == 264
    te = [m for m in modules if m.startswith("lora_te_")]
    assert len(te) == 72
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te
    assert all(s == {"lora_down.weight", "lora_up.weight", "alpha"} for s in modules.values())


def test_exported_file_loads_in_diffusers_and_matches_the_trained_adapter(tmp_path, tiny_model_dir, images):
    """The saved training state holds the trained LoRA weights; the exported file, loaded by diffusers'
    load_lora_weights, must give the same UNet and text-encoder outputs (alpha != rank)."""
    from diffusers import StableDiffusionPipeline

    from lora_offset.training import networks
    from lora_offset.tiny import build_tiny_components

    config = write_config(tmp_path, tiny_model_dir, images, network={"train_text_encoder": True, "rank": 4, "alpha": 3.0},
                          training={"max_steps": 3, "save_every_steps": 2, "save_state_every_steps": 2})
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "out"
    state = torch.load(sorted((out / "state").glob("state-*.pt"))[-1], weights_only=True)
    assert state["step"] == 2
    # The adapter as trained: tiny base + PEFT LoRA with the state's weights.
    trained = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    networks.add_lora(trained.unet, networks.unet_lora_config(4, 3.0))
    networks.add_lora(trained.text_encoder, networks.text_encoder_lora_config(4, 3.0))
    for model, key in ((trained.unet, "unet_lora"), (trained.text_encoder, "text_encoder_lora")):
        missing = set(dict(model.named_parameters())) & set(state[key])
        assert len(missing) == len(state[key]) > 0
        model.load_state_dict(state[key], strict=False)
    # The exported file at the same step, through diffusers' own loader.
    loaded = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    loaded.load_lora_weights(str(out / "tiny-step000002.safetensors"))
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 77))
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        te_trained, te_loaded = trained.text_encoder(ids)[0], loaded.text_encoder(ids)[0]
        cond = te_trained
        unet_trained = trained.unet(x, t, cond).sample
        unet_loaded = loaded.unet(x, t, cond).sample
        base = build_tiny_components(seed=0)
    torch.testing.assert_close(te_loaded, te_trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unet_loaded, unet_trained, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(base["unet"](x, t, cond).sample, unet_trained, atol=1e-4)  # the LoRA matters


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_model_dir, images):
    """Run A trains 4 steps and saves its state at step 2; run B resumes from that state in a fresh
    output folder and trains steps 3-4. The final adapters are bit-identical (CPU, fixed seed)."""
    runs = {}
    for name in ("a", "b"):
        runs[name] = write_config(tmp_path / name, tiny_model_dir, images, training={
            "max_steps": 4, "save_state_every_steps": 2, "output_dir": str(tmp_path / name / "out"),
            "optimizer": "adamw8bit", "gradient_checkpointing": True}, noise={"offset": 0.1, "input_perturbation": 0.1})
    assert main(["train", "--config", str(runs["a"])]) == 0
    assert main(["train", "--config", str(runs["b"]), "--resume", str(tmp_path / "a" / "out" / "state")]) == 0
    a = load_file(tmp_path / "a" / "out" / "tiny.safetensors")
    b = load_file(tmp_path / "b" / "out" / "tiny.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # ...and differ from the state it resumed from: steps 3-4 really ran.
    state = torch.load(tmp_path / "a" / "out" / "state" / "state-00000002.pt", weights_only=True)
    assert state["step"] == 2


def test_loss_drops_when_overfitting_a_few_images(tmp_path, tiny_model_dir, images):
    """Fixed evaluation batch (same latents, noise, timesteps): the trained LoRA's loss is lower than the base's."""
    from diffusers import StableDiffusionPipeline

    from lora_offset.training.step import encode_images
    from lora_offset.training.text import encode_prompts

    config = write_config(tmp_path, tiny_model_dir, images, network={"rank": 8, "alpha": 8.0},
                          training={"max_steps": 20, "learning_rate": 3e-3, "optimizer": "adamw"},
                          noise={"offset": 0.0})
    assert main(["train", "--config", str(config)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in sorted(images.glob("*.png"))])
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = encode_images(pipe.vae, pixels, torch.float32).repeat(8, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
        from lora_offset.training.noise import add_noise

        alphas_cumprod = torch.cumprod(1 - pipe.scheduler.betas, 0)
        noisy = add_noise(latents, noise, t, alphas_cumprod)
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["sks dog"] * latents.shape[0])
        base_loss = torch.mean((pipe.unet(noisy, t, cond).sample - noise) ** 2).item()
        pipe.load_lora_weights(str(tmp_path / "out" / "tiny.safetensors"))
        lora_loss = torch.mean((pipe.unet(noisy, t, cond).sample - noise) ** 2).item()
    assert lora_loss < 0.9 * base_loss, (base_loss, lora_loss)


def test_gradients_with_and_without_checkpointing_agree(tiny_components):
    from lora_offset.training import networks

    unet = tiny_components["unet"]
    params = networks.add_lora(unet, networks.unet_lora_config(4, 4.0))
    with torch.no_grad():
        for p in params:  # non-zero lora_B so every LoRA parameter gets a gradient
            p.normal_(0, 0.02)
    torch.manual_seed(1)
    # 16x16 latents: at 8x8 the mid block sees one token and its self-attention q/k get no gradient.
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([5, 500]), torch.randn(2, 77, 32)
    unet.train()

    def grads():
        unet.zero_grad(set_to_none=True)
        unet(x, t, cond).sample.pow(2).mean().backward()
        return [p.grad.clone() for p in params]

    plain = grads()
    unet.enable_gradient_checkpointing()
    checkpointed = grads()
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_adamw8bit_keeps_8bit_optimizer_state(tmp_path, tiny_model_dir, images):
    """bitsandbytes keeps 8-bit moments for tensors of >= 4096 elements (rank 64 makes some here)."""
    config = write_config(tmp_path, tiny_model_dir, images, network={"rank": 64, "alpha": 32.0},
                          training={"max_steps": 2, "save_state_every_steps": 1, "optimizer": "adamw8bit"})
    assert main(["train", "--config", str(config)]) == 0
    state = torch.load(sorted((tmp_path / "out" / "state").glob("state-*.pt"))[-1], weights_only=True)
    # bitsandbytes 0.50 nests the moments under "__bnb_optimizer_quant_state__" in its state_dict.
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in state["optimizer"]["state"].values()]
    assert len(moments) == 2 * 192 and all("state1" in m for m in moments)
    large = [s for s in moments if s["state1"].numel() >= 4096]
    assert large, "no LoRA tensor large enough for 8-bit state"
    for s in large:
        assert s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8


@pytest.mark.parametrize("case", ["missing_folder", "empty_folder", "unknown_key", "wrong_type"])
def test_bad_input_is_one_line_error_before_the_model_loads(tmp_path, images, case, capsys):
    # A model path that does not exist: reaching the model load would be a different error.
    missing_model = tmp_path / "no-model"
    image_dir = images
    sets: list[str] = []
    if case == "missing_folder":
        image_dir = tmp_path / "nowhere"
    elif case == "empty_folder":
        image_dir = tmp_path / "empty"
        image_dir.mkdir()
    elif case == "unknown_key":
        sets = ["training.max_stesp=3"]
    elif case == "wrong_type":
        sets = ["training.max_steps='3'"]
    config = write_config(tmp_path, missing_model, image_dir)
    argv = ["train", "--config", str(config)] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if line.startswith("error: ")]
    assert len(message) == 1 and "Traceback" not in "\n".join(err)
    expected = {
        "missing_folder": str(tmp_path / "nowhere"),
        "empty_folder": str(tmp_path / "empty"),
        "unknown_key": "unknown key 'training.max_stesp'; did you mean 'training.max_steps'?",
        "wrong_type": "training.max_steps must be an integer",
    }[case]
    assert expected in message[0]
    assert "no-model" not in message[0]


def test_missing_base_model_and_missing_component(tmp_path, tiny_model_dir, images, capsys):
    import shutil

    config = write_config(tmp_path, tmp_path / "no-model", images)
    assert main(["train", "--config", str(config)]) == 2
    assert f"model.pretrained = '{tmp_path / 'no-model'}' does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    config = write_config(tmp_path, broken, images)
    assert main(["train", "--config", str(config)]) == 2
    assert f"base model folder '{broken}' is missing its vae component" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_refused(tmp_path, tiny_model_dir, images, capsys):
    (tmp_path / "out").write_text("not a folder")
    config = write_config(tmp_path, tiny_model_dir, images)
    assert main(["train", "--config", str(config)]) == 2
    assert f"training.output_dir = '{tmp_path / 'out'}' is a file" in capsys.readouterr().err


def test_output_dir_not_writable_or_too_full_is_refused_before_the_model_loads(tmp_path, images, capsys, monkeypatch):
    import collections
    import shutil

    config = write_config(tmp_path, tmp_path / "no-model", images)  # reaching the model load would fail differently
    real_write = Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".write-test-"):
            raise PermissionError(13, "Permission denied")
        return real_write(self, data)

    with monkeypatch.context() as m:  # (tests run as root, whom chmod does not stop)
        m.setattr(Path, "write_bytes", refuse)
        assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: training.output_dir = '{tmp_path / 'out'}' is not writable: Permission denied")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 << 20, 90 << 20, 10 << 20))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: training.output_dir = '{tmp_path / 'out'}' has 10 MiB free; a save needs about ")
    assert "no-model" not in err


def test_prior_preservation_generates_class_images_and_writes_samples(tmp_path, tiny_model_dir, images):
    """A reg subset with num_class_images: missing class images are generated by the base model before
    training; sample images land as PNGs and in TensorBoard every sample_every_steps."""
    class_dir = tmp_path / "class"
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "max_steps": 2, "sample_every_steps": 2, "sample_prompts": ["sks dog", "dog"], "sample_steps": 2,
        "prior_loss_weight": 0.5})
    data = toml.loads(config.read_text())
    data["dataset"]["subsets"].append({"image_dir": str(class_dir), "class_tokens": "dog", "is_reg": True,
                                       "num_class_images": 3})
    config.write_text(toml.dumps(data))
    assert main(["train", "--config", str(config)]) == 0
    generated = sorted(class_dir.glob("*.png"))
    assert len(generated) == 3
    assert Image.open(generated[0]).size == (64, 64)
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(samples) == 2 and all("step000000002" in p.name for p in samples)
    events = list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"loss", "lr"} <= set(acc.Tags()["scalars"])
    assert len(acc.Tags()["images"]) == 2
    with safe_open(str(tmp_path / "out" / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "3"
    assert meta["ss_prior_loss_weight"] == "0.5"
    # A second run finds the class images there and generates none.
    before = [p.stat().st_mtime_ns for p in generated]
    assert main(["train", "--config", str(config), "--set", "training.sample_every_steps=0"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == before


def test_train_from_a_single_file_ldm_checkpoint(tmp_path, tiny_model_dir, images):
    """model.pretrained = an SD 1.x single .safetensors (original LDM layout), with its config folder."""
    from diffusers import StableDiffusionPipeline

    from lora_offset.formats.ldm import save_ldm_checkpoint

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    single = tmp_path / "tiny-sd1.safetensors"
    save_ldm_checkpoint({"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}, single)
    config = write_config(tmp_path, single, images, model={"config_dir": str(tiny_model_dir)}, training={"max_steps": 1})
    assert main(["train", "--config", str(config)]) == 0
    assert len(module_names(tmp_path / "out" / "tiny.safetensors")) == 192


def test_v_prediction_zero_terminal_snr_min_snr_and_pyramid_noise_train_and_are_recorded(tmp_path, tiny_model_dir, images):
    config = write_config(tmp_path, tiny_model_dir, images, model={"prediction_type": "v_prediction"},
                          noise={"zero_terminal_snr": True, "min_snr_gamma": 5.0, "pyramid_iterations": 3,
                                 "pyramid_discount": 0.4, "adaptive_offset": 0.05, "offset_random_strength": True,
                                 "input_perturbation": 0.1},
                          training={"max_steps": 2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
                                    "lr_warmup_steps": 1})
    assert main(["train", "--config", str(config)]) == 0
    path = tmp_path / "out" / "tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_base_model_version"] == "sd_v1_v"
    assert meta["ss_zero_terminal_snr"] == "True"
    assert meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_multires_noise_iterations"] == "3" and meta["ss_multires_noise_discount"] == "0.4"
    assert meta["ss_ip_noise_gamma"] == "0.1"
    assert meta["ss_steps"] == "2"
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(k.endswith("lora_up.weight") and t.abs().sum() > 0 for k, t in tensors.items())


def test_kohya_prompt_file_sets_each_samples_size_seed_steps_guidance_negative_and_sampler(tmp_path, tiny_model_dir,
                                                                                           images):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# kohya sample prompts\n"
        "sks dog --n blurry, lowres --w 64 --h 96 --d 7 --l 5.5 --s 2\n"
        "\n"
        "sks dog --n blurry, lowres --w 64 --h 96 --d 7 --l 5.5 --s 2\n"
        "a cat --W 96 --H 64 --d 8 --s 3 --l 1 --ss euler_a\n"
        "dog\n"
        "sks dog --n blurry, lowres --w 64 --h 96 --d 9 --l 5.5 --s 2\n", encoding="utf-8")
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "max_steps": 1, "sample_every_steps": 1, "sample_prompts": str(prompts), "sample_sampler": "dpmsolver++",
        "sample_steps": 2})
    assert main(["train", "--config", str(config)]) == 0
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step000000001_00_sks-dog.png", "step000000001_01_sks-dog.png",
                                         "step000000001_02_a-cat.png", "step000000001_03_dog.png",
                                         "step000000001_04_sks-dog.png"]
    pixels = [np.asarray(Image.open(p)) for p in samples]
    assert [Image.open(p).size for p in samples] == [(64, 96), (64, 96), (96, 64), (64, 64), (64, 96)]
    assert np.array_equal(pixels[0], pixels[1])  # same prompt, seed and settings: the same image
    assert not np.array_equal(pixels[0], pixels[4])  # only the seed differs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Tags()["images"]) == 5


def test_bad_prompt_file_line_stops_before_training(tmp_path, tiny_model_dir, images, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog --w 64\na cat --ss euler_b\n", encoding="utf-8")
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "sample_every_steps": 1, "sample_prompts": str(prompts)})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{prompts} line 2: sampler 'euler_b' is not one of ddim, pndm" in err
    assert not (tmp_path / "out").exists()
