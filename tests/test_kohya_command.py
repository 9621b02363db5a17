"""`lora-offset kohya`: kohya sd-scripts' train_network.py command line and config file, run unchanged
on the tiny model (issue 23)."""

from __future__ import annotations

import inspect
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import toml
from safetensors import safe_open
from safetensors.torch import load_file

from lora_offset.cli import main
from lora_offset.formats import kohya_args, kohya_options, kohya_recipe
from tests.test_train import make_images

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def documented_command(model, dataset_config, output_dir) -> list[str]:
    """sd-scripts docs/train_network.md, "Running the Training", with the paths filled in."""
    return [f"--pretrained_model_name_or_path={model}", f"--dataset_config={dataset_config}",
            f"--output_dir={output_dir}", "--output_name=my_lora", "--save_model_as=safetensors",
            "--network_module=networks.lora", "--network_dim=16", "--network_alpha=1", "--learning_rate=1e-4",
            '--optimizer_type=AdamW8bit', '--lr_scheduler=constant', "--sdpa", "--max_train_epochs=10",
            "--save_every_n_epochs=1", '--mixed_precision=fp16', "--gradient_checkpointing"]


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_kohyas_documented_command_runs_unchanged_under_accelerate_launch(tmp_path, tiny_model_dir,
                                                                         kohya_dataset_config):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1", "--num_processes",
         "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_offset",
         "kohya", *documented_command(tiny_model_dir, kohya_dataset_config, out)],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "--sdpa: accepted, no effect here" in log and "--save_model_as: accepted, no effect here" in log
    assert "add --noise_offset=0.1" in log  # kohya's default has no offset noise: one line says how
    # 10 epochs of one image: an epoch file after each of the first 9, the last one is the final file.
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        *(f"my_lora-{e:06d}.safetensors" for e in range(1, 10)), "my_lora.safetensors"]
    meta = metadata(out / "my_lora.safetensors")
    expected = {"ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "1.0",
                "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0001", "ss_text_encoder_lr": "0.0001",
                "ss_lr_scheduler": "constant", "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
                "ss_mixed_precision": "fp16", "ss_num_epochs": "10", "ss_epoch": "10", "ss_steps": "10",
                "ss_max_train_steps": "10", "ss_noise_offset": "0.0", "ss_gradient_checkpointing": "True",
                "ss_max_grad_norm": "1.0", "ss_cache_latents": "False", "ss_output_name": "my_lora",
                "ss_clip_skip": "1", "ss_network_args": "{}"}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["ss_seed"].isdigit()  # no --seed: kohya draws one, and records it
    # kohya trains the text encoder unless --network_train_unet_only: 192 UNet + 72 text-encoder modules.
    modules = {k.split(".")[0] for k in load_file(out / "my_lora.safetensors")}
    assert (sum(m.startswith("lora_unet_") for m in modules), sum(m.startswith("lora_te_") for m in modules)) == (
        192, 72)


def test_the_same_recipe_as_a_config_file_gives_a_bit_identical_adapter(tmp_path, tiny_model_dir,
                                                                        kohya_dataset_config):
    """kohya's --config_file: sections ignored, argparse names as keys, the command line overrides the file."""
    args = documented_command(tiny_model_dir, kohya_dataset_config, tmp_path / "cli") + [
        "--seed=3", "--max_train_epochs=2", "--network_args", "conv_dim=2", "conv_alpha=1"]
    assert main(["kohya", *args]) == 0
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(toml.dumps({
        "model_arguments": {"pretrained_model_name_or_path": str(tiny_model_dir), "network_dim": 4},
        "dataset_arguments": {"dataset_config": str(kohya_dataset_config)},
        "training_arguments": {"output_dir": str(tmp_path / "file"), "output_name": "my_lora",
                               "save_model_as": "safetensors", "max_train_epochs": 2, "save_every_n_epochs": 1,
                               "mixed_precision": "fp16", "gradient_checkpointing": True, "sdpa": True, "seed": 3},
        "optimizer_arguments": {"learning_rate": 1e-4, "optimizer_type": "AdamW8bit", "lr_scheduler": "constant"},
        "network_arguments": {"network_module": "networks.lora", "network_alpha": 1,
                              "network_args": ["conv_dim=2", "conv_alpha=1"]},
    }), encoding="utf-8")
    # The file says network_dim 4; the command line's 16 wins, as in kohya.
    assert main(["kohya", "--config_file", str(recipe.with_suffix("")), "--network_dim=16"]) == 0
    a, b = load_file(tmp_path / "cli" / "my_lora.safetensors"), load_file(tmp_path / "file" / "my_lora.safetensors")
    assert a.keys() == b.keys() and len(a) == 3 * (192 + 72 + 85)  # conv_dim: the LoCon modules too
    assert all(a[k].equal(b[k]) for k in a)
    assert a["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 16


def test_output_config_writes_the_recipe_back_and_it_round_trips(tmp_path, tiny_model_dir, kohya_dataset_config,
                                                                 capsys):
    args = documented_command(tiny_model_dir, kohya_dataset_config, tmp_path / "out") + [
        "--network_args", "conv_dim=4", "--optimizer_args", "betas=0.9,0.99", "--lr_scheduler=cosine",
        "--lr_warmup_steps=5%", "--text_encoder_lr", "5e-5"]
    recipe = tmp_path / "recipe"
    assert main(["kohya", *args, "--config_file", str(recipe), "--output_config"]) == 0
    written = toml.loads((tmp_path / "recipe.toml").read_text(encoding="utf-8"))
    # What kohya writes: every value that differs from its default (--network_alpha=1 is the default), in its
    # argparse types.
    assert written == {
        "pretrained_model_name_or_path": str(tiny_model_dir), "dataset_config": str(kohya_dataset_config),
        "output_dir": str(tmp_path / "out"), "output_name": "my_lora", "network_module": "networks.lora",
        "network_dim": 16, "learning_rate": 1e-4, "optimizer_type": "AdamW8bit",
        "sdpa": True, "max_train_epochs": 10, "save_every_n_epochs": 1, "mixed_precision": "fp16",
        "gradient_checkpointing": True, "network_args": ["conv_dim=4"], "optimizer_args": ["betas=0.9,0.99"],
        "lr_scheduler": "cosine", "lr_warmup_steps": 0.05, "text_encoder_lr": [5e-5]}
    assert not (tmp_path / "out").exists()  # nothing trained
    # kohya refuses to overwrite the file; so does lora-offset.
    assert main(["kohya", *args, "--config_file", str(recipe), "--output_config"]) == 2
    assert "exists already" in capsys.readouterr().err
    # The file runs the same recipe as the command line (seed aside, which kohya draws when unset).
    capsys.readouterr()
    assert main(["kohya", *args, "--seed=1", "--print-config"]) == 0
    from_cli = toml.loads(capsys.readouterr().out)
    assert main(["kohya", "--config_file", str(recipe) + ".toml", "--seed=1", "--print-config"]) == 0
    from_file = toml.loads(capsys.readouterr().out)
    assert from_cli == from_file
    assert (from_file["network"]["conv_rank"], from_file["training"]["optimizer_args"]) == (4, {"betas": [0.9, 0.99]})
    assert (from_file["training"]["lr_warmup_steps"], from_file["training"]["text_encoder_lr"]) == (0.05, 5e-5)


def test_print_config_is_a_lora_offset_config_that_trains_the_same(tmp_path, tiny_model_dir, kohya_dataset_config,
                                                                   capsys):
    args = documented_command(tiny_model_dir, kohya_dataset_config, tmp_path / "kohya") + [
        "--seed=0", "--max_train_epochs=1"]
    assert main(["kohya", *args, "--print-config"]) == 0
    ours = tmp_path / "ours.toml"
    ours.write_text(capsys.readouterr().out.replace(str(tmp_path / "kohya"), str(tmp_path / "ours")), encoding="utf-8")
    assert main(["kohya", *args]) == 0
    assert main(["train", "--config", str(ours)]) == 0
    a, b = load_file(tmp_path / "kohya" / "my_lora.safetensors"), load_file(tmp_path / "ours" / "my_lora.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def print_config(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["kohya", *args, "--print-config"]) == 0
    return toml.loads(capsys.readouterr().out)


def test_absent_options_take_kohyas_defaults(tmp_path, kohya_dataset_config, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lora_offset")
    c = print_config(capsys, "--pretrained_model_name_or_path=m", f"--dataset_config={kohya_dataset_config}",
                     "--output_dir=o", "--seed=1")
    n, z, t, d = c["network"], c["noise"], c["training"], c["dataset"]
    assert (n["type"], n["rank"], n["alpha"], n["train_text_encoder"], n["conv_rank"]) == ("lora", 4, 1.0, True, 0)
    assert (z["offset"], z["min_snr_gamma"], z["pyramid_iterations"]) == (0.0, 0.0, 0)
    assert (t["learning_rate"], t["text_encoder_lr"], t["optimizer"], t["weight_decay"]) == (2e-6, 2e-6, "adamw", 0.01)
    assert (t["lr_scheduler"], t["max_steps"], t["save_precision"], t["mixed_precision"]) == ("constant", 1600, "fp32",
                                                                                            "no")
    assert (t["gradient_checkpointing"], t["cache_latents"], t["save_state_every_steps"]) == (False, False, 0)
    assert (t["output_name"], t["log_with"], t["clip_skip"], t["max_token_length"]) == ("last", "none", 1, 75)
    # The dataset file's own caption_extension wins; its absent keys come from the command line's defaults.
    assert (d["resolution"], d["batch_size"], d["subsets"][0]["caption_extension"]) == (64, 1, ".txt")
    assert kohya_recipe.OFFSET_HINT in caplog.messages


def test_command_line_dataset_options_fill_in_what_the_dataset_file_leaves_out(tmp_path, capsys, caplog):
    """kohya's BlueprintGenerator: subset <- dataset <- [general] <- the command line <- kohya's defaults."""
    import logging

    caplog.set_level(logging.INFO, logger="lora_offset")
    images = make_images(tmp_path / "train" / "5_sks dog", 1)
    make_images(tmp_path / "reg" / "1_dog", 1)
    (tmp_path / "train" / "not a kohya folder").mkdir()
    base = ["--pretrained_model_name_or_path=m", "--output_dir=o", "--seed=1"]
    c = print_config(capsys, *base, f"--train_data_dir={tmp_path / 'train'}", f"--reg_data_dir={tmp_path / 'reg'}",
                     "--resolution=64,128", "--train_batch_size=2", "--flip_aug", "--keep_tokens=1")
    assert any("skipped folders not named <repeats>_<class tokens> (as kohya): not a kohya folder" in m
               for m in caplog.messages)
    d = c["dataset"]
    assert (d["resolution"], d["batch_size"]) == ([64, 128], 2)
    assert [(s["image_dir"], s["num_repeats"], s["class_tokens"], s["is_reg"], s["flip_aug"], s["keep_tokens"],
             s["caption_extension"]) for s in d["subsets"]] == [
        (str(images), 5, "sks dog", False, True, 1, ".caption"), (str(tmp_path / "reg" / "1_dog"), 1, "dog", True,
                                                                  True, 1, ".caption")]
    # A dataset file's subset without num_repeats gets kohya's 1 (dataset_repeats), not its folder's 5.
    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\nflip_aug = false\n',
                    encoding="utf-8")
    c = print_config(capsys, *base, f"--dataset_config={data}", "--resolution=64", "--flip_aug", "--caption_extention=.txt")
    (s,) = c["dataset"]["subsets"]
    assert (s["num_repeats"], s["flip_aug"], s["caption_extension"]) == (1, False, ".txt")
    assert s["class_tokens"] == "sks dog"  # from the folder name, for images without a caption file


def test_save_state_and_adafactor_follow_kohya(kohya_dataset_config, capsys):
    base = ["--pretrained_model_name_or_path=m", f"--dataset_config={kohya_dataset_config}", "--output_dir=o",
            "--seed=1"]
    assert print_config(capsys, *base, "--save_state")["training"]["save_state_every_steps"] == 100
    assert print_config(capsys, *base, "--save_state", "--save_every_n_steps=20")["training"][
        "save_state_every_steps"] == 20
    t = print_config(capsys, *base, "--optimizer_type=adafactor", "--optimizer_args", "relative_step=False",
                     "weight_decay=0.1")["training"]
    assert (t["optimizer"], t["optimizer_args"], t["weight_decay"]) == ("adafactor", {"relative_step": False}, 0.1)
    assert main(["kohya", *base, "--optimizer_type=Adafactor"]) == 2
    assert "kohya's default relative_step=True" in capsys.readouterr().err


def test_output_config_writes_nothing_for_a_recipe_that_cannot_run(tmp_path, kohya_dataset_config, capsys):
    assert main(["kohya", "--pretrained_model_name_or_path=m", f"--dataset_config={kohya_dataset_config}",
                 "--output_dir=o", "--full_fp16", "--config_file", str(tmp_path / "r"), "--output_config"]) == 2
    assert "--full_fp16: the LoRA weights stay fp32" in capsys.readouterr().err
    assert not (tmp_path / "r.toml").exists()


def test_unsupported_options_are_one_error_that_lists_them_all(tmp_path, capsys):
    code = main(["kohya", "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--output_dir", "o",
                 "--train_data_dir", str(tmp_path), "--resolution=64", "--full_fp16", "--v2",
                 "--clip_l", "clip.safetensors", "--cache_text_encoder_outputs", "--huggingface_repo_id=me/lora",
                 "--network_dimm=4", "--save_model_as=ckpt", "--optimizer_type=DAdaptAdam", "--no_metadata",
                 "--network_args", "foo=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: kohya arguments: 11 of these arguments cannot be honoured by lora-offset:")
    for expected in ("--full_fp16: the LoRA weights stay fp32",
                     "--v2: Stable Diffusion 2.x (lora-offset trains SD 1.x)",
                     "--clip_l: an option of SD3 (sd3_train_network.py) and FLUX (flux_train_network.py)",
                     "--cache_text_encoder_outputs: an option of SDXL (sdxl_train_network.py)",
                     "--huggingface_repo_id: uploading to or resuming from the Hugging Face Hub is not implemented",
                     "--network_dimm: not a train_network.py option (did you mean --network_dim?)",
                     "--save_model_as: lora-offset writes .safetensors only",
                     "--optimizer_type=DAdaptAdam: not implemented; lora-offset has AdamW8bit, AdamW",
                     "--no_metadata: the ss_* metadata is how web UIs recognise the file",
                     "--network_args foo: networks.lora has no such argument",
                     "no subfolder named like '10_sks dog'"):
        assert expected in err, expected
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--network_dim=abc"], "kohya arguments: argument --network_dim: invalid int value: 'abc'"),
    (["--max_token_length=100"], "argument --max_token_length: invalid choice: 100"),
    (["stray"], "'stray': train_network.py takes no positional arguments"),
    (["--output_config"], "--output_config writes the recipe to --config_file"),
    (["--pretrained_model_name_or_path=m", "--output_dir=o", "--train_data_dir=.", "--lr_warmup_steps=10"],
     "--lr_warmup_steps with --lr_scheduler=constant: kohya refuses it too"),
])
def test_malformed_arguments_are_one_clear_error(args, message, capsys):
    assert main(["kohya", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "usage:" not in err


def test_config_file_values_are_checked_by_kohyas_types(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[a]\nnetwork_dim = "16"\nmax_grad_norm = true\nmixed_precision = "fp32"\nxformers = 1\n'
                    'network_dimm = 4\nt5xxl = "t5.safetensors"\n', encoding="utf-8")
    assert main(["kohya", "--config_file", str(path)]) == 2
    err = capsys.readouterr().err
    for expected in (f"{path}: network_dim must be an integer, got str '16'",
                     f"{path}: max_grad_norm must be a number, got bool True",
                     f"{path}: mixed_precision must be one of no, fp16, bf16, got 'fp32'",
                     f"{path}: xformers must be true or false, got int 1",
                     f"{path}: network_dimm: not a train_network.py option (did you mean network_dim?)",
                     f"{path}: t5xxl: an option of SD3"):
        assert expected in err, expected


def test_no_effect_options_each_say_so_in_one_line(tmp_path, kohya_dataset_config, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lora_offset")
    flags = [f"--{name}" for name, option in kohya_options.OPTIONS.items()
             if name in kohya_options.NO_EFFECT and option.type is None]
    main(["kohya", "--pretrained_model_name_or_path=m", f"--dataset_config={kohya_dataset_config}", "--output_dir=o",
          *flags, "--vae_batch_size=4", "--print-config"])
    lines = [r.getMessage() for r in caplog.records if ": accepted, no effect here: " in r.getMessage()]
    assert sorted(line.split(":")[0] for line in lines) == sorted(flags + ["--vae_batch_size"])


def test_every_option_is_supported_without_effect_or_refused_and_every_supported_one_is_read():
    options = set(kohya_options.OPTIONS)
    assert len(options) == 193  # train_network.py's parser (sd-scripts 2026-02)
    assert set(kohya_options.NO_EFFECT) <= options and set(kohya_options.REFUSED) <= options
    assert set(kohya_options.ACCEPTED) <= set(kohya_options.REFUSED)
    assert not set(kohya_options.FAMILY_OPTIONS) & options
    values, given = kohya_args.command_line_values({"pretrained_model_name_or_path": "m", "output_dir": "o",
                                                    "train_data_dir": "t"})
    recipe = kohya_recipe.to_config(values, given, seed=0, train_subfolders=["1_x"])
    supported = options - set(kohya_options.NO_EFFECT) - set(kohya_options.REFUSED) - {
        "config_file", "output_config", "dataset_config", "cache_info", "face_crop_aug_range"}
    assert supported - recipe.options_read == set()


def test_kohyas_weight_decay_defaults_are_the_optimizer_classes_own():
    from lora_offset.training.optimizers import OPTIMIZERS, optimizer_class

    assert set(kohya_recipe.WEIGHT_DECAY_DEFAULTS) == set(OPTIMIZERS)
    for name, default in kohya_recipe.WEIGHT_DECAY_DEFAULTS.items():
        parameter = inspect.signature(optimizer_class(name).__init__).parameters["weight_decay"]
        assert parameter.default == default, name


def test_parsing_is_kohyas_argparse():
    cl = kohya_args.parse_command_line(["--network_dim", "8", "--learning_rat=1e-3", "--xformers",
                                        "--network_args", "conv_dim=4", "conv_alpha=1", "--lr_warmup_steps", "0.1",
                                        "--text_encoder_lr", "1e-5", "2e-5", "--dataset_config", "d.toml"])
    assert cl.problems == []
    assert cl.values == {"network_dim": 8, "learning_rate": 1e-3, "xformers": True,
                         "network_args": ["conv_dim=4", "conv_alpha=1"], "lr_warmup_steps": 0.1,
                         "text_encoder_lr": [1e-5, 2e-5], "dataset_config": Path("d.toml")}
    assert kohya_options.int_or_float("5%") == 0.05 and kohya_options.int_or_float("100") == 100
    assert kohya_args.config_file_path("recipe") == Path("recipe.toml")
    assert kohya_args.flatten_config_file({"a": {"x": 1}, "y": 2, "b": {"z": 3}}) == {"x": 1, "y": 2, "z": 3}


def doc_section(text: str, title: str) -> str:
    part = text[text.index(title):]
    end = part.find("\n## ", 1)
    return part if end < 0 else part[:end]


def test_docs_list_every_option_as_supported_without_effect_or_refused():
    """docs/kohya.md: all 193 options, each in its group, the no-effect and refused ones with the code's reason."""
    text = (ROOT / "docs" / "kohya.md").read_text(encoding="utf-8")
    supported, no_effect = doc_section(text, "## Supported options"), doc_section(text, "## Accepted without effect")
    refused = doc_section(text, "## Refused")
    for name, why in kohya_options.NO_EFFECT.items():
        assert f"| `--{name}` | {why} |" in no_effect, name
    for name, why in kohya_options.REFUSED.items():
        assert f"| `--{name}` | {why}" in refused, name
    from lora_offset.formats.kohya_dataset import REFUSED as DATASET_REFUSED

    for name in ("cache_info", "face_crop_aug_range"):
        assert f"| `--{name}` | {DATASET_REFUSED[name][1]} |" in refused, name
    assert f"| `--v2` | {kohya_options.SD2} |" in refused
    for name in kohya_options.FAMILY_OPTIONS:
        assert f"`--{name}`" in refused, name
    special = {"v2", "cache_info", "face_crop_aug_range"}
    for name in set(kohya_options.OPTIONS) - set(kohya_options.NO_EFFECT) - set(kohya_options.REFUSED) - special:
        assert re.search(rf"^\|.*`--{name}`.*\|$", supported, flags=re.M), name
        assert f"`--{name}`" not in no_effect + refused, name
    assert text.split("```bash parse\n", 1)[1].startswith("lora-offset kohya ")  # the page opens with a command line
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_lora = doc_section(readme, "## Train your first LoRA")
    assert "`lora-offset kohya`" in first_lora and "(docs/kohya.md)" in first_lora
