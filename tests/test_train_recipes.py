"""kohya recipes through the real command line on the tiny model: the options of issue 11."""

from __future__ import annotations

import pytest
import toml
import torch
from PIL import Image
from safetensors import safe_open

from lora_offset.cli import main
from tests.test_train import make_images, write_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "10_sks dog", 4)


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_huber_loss_debiased_estimation_and_a_timestep_range(tmp_path, tiny_model_dir, images, monkeypatch):
    from lora_offset.training import noise

    drawn = []
    real = noise.sample_timesteps

    def recording(*args, **kwargs):
        timesteps = real(*args, **kwargs)
        drawn.append(timesteps.clone())
        return timesteps

    monkeypatch.setattr(noise, "sample_timesteps", recording)
    config = write_config(tmp_path, tiny_model_dir, images,
                          training={"max_steps": 3, "loss_type": "huber", "huber_schedule": "exponential",
                                    "huber_c": 0.2, "debiased_estimation": True},
                          noise={"min_snr_gamma": 5.0, "min_timestep": 100, "max_timestep": 200})
    assert main(["train", "--config", str(config)]) == 0
    drawn = torch.cat(drawn)
    assert len(drawn) == 3 * 2 and drawn.min() >= 100 and drawn.max() < 200
    meta = metadata(tmp_path / "out" / "tiny.safetensors")
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "exponential", "0.2")
    assert meta["ss_debiased_estimation"] == "True" and meta["ss_min_snr_gamma"] == "5.0"
    assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == ("100", "200")


@pytest.mark.parametrize("sets, message", [
    (["noise.min_timestep=500", "noise.max_timestep=500"], "0 <= min_timestep < max_timestep <= 1000"),
    (["noise.max_timestep=1001"], "0 <= min_timestep < max_timestep <= 1000"),
    (["training.huber_c=0"], "training.huber_c must be in (0, 1]"),
    (["training.loss_type='l3'"], "training.loss_type must be one of 'l2' | 'l1' | 'huber' | 'smooth_l1'"),
    (["training.huber_schedule='linear'"], "training.huber_schedule must be one of"),
])
def test_bad_loss_and_timestep_settings_are_one_error(tmp_path, images, sets, message, capsys):
    config = write_config(tmp_path, tmp_path / "no-model", images)
    assert main(["train", "--config", str(config)] + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model" not in err


def test_epochs_epoch_files_last_n_and_epoch_samples(tmp_path, tiny_model_dir):
    """4 images, batch 2: 2 steps per epoch. 3 epochs = 6 steps; an epoch file after epochs 1 and 2 (the
    last epoch is the final file), the last 1 kept; step files every step, the last 2 steps' kept;
    samples before training and after epoch 2."""
    images = make_images(tmp_path / "plain", 4)
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "max_steps": None, "max_train_epochs": 3, "save_every_n_epochs": 1, "save_last_n_epochs": 1,
        "save_every_steps": 1, "save_last_n_steps": 2, "sample_every_n_epochs": 2, "sample_at_first": True,
        "sample_prompts": ["sks dog"], "sample_steps": 2})
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "tiny-000002.safetensors", "tiny-step000003.safetensors", "tiny-step000004.safetensors",
        "tiny-step000005.safetensors", "tiny.safetensors"]
    final, epoch2 = metadata(out / "tiny.safetensors"), metadata(out / "tiny-000002.safetensors")
    assert (final["ss_epoch"], final["ss_steps"], final["ss_num_epochs"], final["ss_max_train_steps"]) == ("3", "6", "3", "6")
    assert (epoch2["ss_epoch"], epoch2["ss_steps"]) == ("2", "4")
    assert metadata(out / "tiny-step000005.safetensors")["ss_epoch"] == "2"
    samples = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert [name[:13] for name in samples] == ["step000000000", "step000000004"]


def test_max_steps_and_max_train_epochs_together_is_an_error(tmp_path, images, capsys):
    config = write_config(tmp_path, tmp_path / "no-model", images, training={"max_train_epochs": 2})
    assert main(["train", "--config", str(config)]) == 2
    assert "training.max_steps and training.max_train_epochs are both set: keep one" in capsys.readouterr().err


def test_clip_skip_2_and_225_token_captions_in_training_samples_and_eval(tmp_path, tiny_model_dir, monkeypatch,
                                                                          caplog):
    """A 150-token caption under max_token_length 225 is not cut; every caption, sample prompt and eval
    prompt goes through the penultimate layer (clip skip 2) in 227-state encodings."""
    import json
    import logging

    from lora_offset.tiny import build_tiny_components
    from lora_offset.training import text
    from tests.test_text import caption_of

    tokenizer = build_tiny_components(seed=0)["tokenizer"]
    long_caption = caption_of(tokenizer, 150)
    images = make_images(tmp_path / "plain", 2)
    for png in images.glob("*.png"):
        png.with_suffix(".txt").write_text(long_caption, encoding="utf-8")
    calls = []
    real = text.encode_tokens

    def recording(text_encoder, ids, clip_skip=1):
        states = real(text_encoder, ids, clip_skip)
        calls.append((clip_skip, tuple(states.shape[:2])))
        return states

    monkeypatch.setattr(text, "encode_tokens", recording)
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "max_steps": 2, "clip_skip": 2, "max_token_length": 225, "sample_every_steps": 2,
        "sample_prompts": [long_caption], "sample_steps": 2})
    caplog.clear()  # only what training logs counts, not building the caption above
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--config", str(config)]) == 0
    assert "longer than" not in caplog.text
    assert calls and all(skip == 2 and length == 227 for skip, (_, length) in calls), calls
    adapter = tmp_path / "out" / "tiny.safetensors"
    meta = metadata(adapter)
    assert (meta["ss_clip_skip"], meta["ss_max_token_length"]) == ("2", "225")
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1

    calls.clear()
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(tiny_model_dir), "--lora", str(adapter), "--prompt", "sks dog", "--n", "1",
                 "--steps", "2", "--resolution", "64", "--clip-skip", "2", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["config"]["clip_skip"] == 2
    assert calls and all(skip == 2 and length == 77 for skip, (_, length) in calls)  # eval keeps 75 tokens


def test_caption_dropout_trains_from_the_cache_with_the_empty_caption(tmp_path, tiny_model_dir, monkeypatch):
    """Every caption a step uses comes from the cache, the empty one included; nothing is encoded after it."""
    from lora_offset.training import text

    encoded = []
    real = text.tokenize

    def recording(tokenizer, prompts, max_token_length=75):
        encoded.extend(prompts)
        return real(tokenizer, prompts, max_token_length)

    monkeypatch.setattr(text, "tokenize", recording)
    images = make_images(tmp_path / "plain", 4)
    config = write_config(tmp_path, tiny_model_dir, images, training={"max_steps": 4})
    data = toml.loads(config.read_text())
    data["dataset"]["subsets"][0].update(caption_dropout_rate=0.5, caption_prefix="photo of")
    config.write_text(toml.dumps(data))
    assert main(["train", "--config", str(config)]) == 0
    assert sorted(encoded) == ["", "photo of sks dog"]  # the cache, built once


def test_a_kohya_notebook_recipe_runs_unchanged(tmp_path, tiny_model_dir):
    """The SD 1.5 LoRA notebook recipe of issue 11, through the CLI: clip skip 2, 225-token captions (a
    150-token one), 3 epochs saved every epoch (last 2 kept), cosine with 3 restarts and 5 % warm-up,
    min-SNR 5 with Huber loss, Prodigy, caption and tag dropout, dim 16 / alpha 8, started from a LoRA, samples
    from a kohya prompt file."""
    from diffusers import StableDiffusionPipeline

    from lora_offset.tiny import build_tiny_components
    from tests.test_start_weights import kohya_file, trained_lora
    from tests.test_text import caption_of

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya sample prompts\n"
                       "sks dog, red collar --n lowres, blurry --w 64 --h 128 --d 7 --s 2 --l 5.5\n"
                       "\n"
                       "sks dog on grass --w 96 --h 64 --d 8 --s 3 --n bad anatomy\n", encoding="utf-8")
    start = kohya_file(tmp_path / "start.safetensors", trained_lora(rank=16, alpha=8.0, conv_rank=0, te=True))
    tokenizer = build_tiny_components(seed=0)["tokenizer"]
    images = make_images(tmp_path / "plain", 2)
    captions = [caption_of(tokenizer, 150), "sks dog, red collar, grass, sunny"]
    for png, caption in zip(sorted(images.glob("*.png")), captions):
        png.with_suffix(".txt").write_text(caption, encoding="utf-8")
    config = write_config(tmp_path, tiny_model_dir, images,
                          network={"rank": 16, "alpha": 8.0, "train_text_encoder": True, "weights": str(start)},
                          noise={"min_snr_gamma": 5.0},
                          training={"max_steps": None, "max_train_epochs": 3, "save_every_n_epochs": 1,
                                    "save_last_n_epochs": 2, "clip_skip": 2, "max_token_length": 225,
                                    "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3,
                                    "lr_warmup_steps": 0.05, "loss_type": "huber", "optimizer": "prodigy",
                                    "learning_rate": 1.0, "sample_every_n_epochs": 3,
                                    "sample_prompts": str(prompts)},
                          dataset={"batch_size": 1})
    data = toml.loads(config.read_text())
    data["dataset"]["subsets"][0].update(caption_dropout_rate=0.1, caption_tag_dropout_rate=0.1, keep_tokens=1,
                                         shuffle_caption=True)
    config.write_text(toml.dumps(data))
    assert main(["train", "--config", str(config)]) == 0

    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "tiny-000001.safetensors", "tiny-000002.safetensors", "tiny.safetensors"]
    for name, epoch, steps in (("tiny-000001", "1", "2"), ("tiny-000002", "2", "4"), ("tiny", "3", "6")):
        meta = metadata(out / f"{name}.safetensors")
        assert (meta["ss_epoch"], meta["ss_steps"], meta["ss_clip_skip"], meta["ss_max_token_length"]) == (
            epoch, steps, "2", "225"), name
    meta = metadata(out / "tiny.safetensors")
    assert meta["ss_optimizer"] == "prodigyopt.prodigy.Prodigy" and meta["ss_loss_type"] == "huber"
    assert (meta["ss_lr_scheduler"], meta["ss_lr_scheduler_num_cycles"], meta["ss_min_snr_gamma"]) == (
        "cosine_with_restarts", "3", "5.0")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("16", "8.0")
    samples = sorted((out / "samples").glob("*.png"))
    assert [p.name[:13] for p in samples] == ["step000000006"] * 2  # after the third epoch
    assert [Image.open(p).size for p in samples] == [(64, 128), (96, 64)]  # --w --h of each prompt
    # The result loads in diffusers: every key is converted (a leftover key makes load_lora_weights raise).
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.load_lora_weights(str(out / "tiny.safetensors"))
    from lora_offset.training.networks import lora_module_names

    assert len(lora_module_names(pipe.unet)) == 192 and len(lora_module_names(pipe.text_encoder)) == 72
