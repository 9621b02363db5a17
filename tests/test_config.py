"""Config: every key checked, errors that name the file, the key and what to do."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_offset.config import Config, load_config
from lora_offset.errors import UserError

MINIMAL = """
[model]
pretrained = "some/model"

[[dataset.subsets]]
image_dir = "imgs"
class_tokens = "sks dog"
"""


def write(tmp_path: Path, text: str, name="config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_minimal_config_gets_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.noise.offset == 0.1  # offset noise is on by default
    assert config.training.optimizer == "adamw8bit"
    assert config.training.gradient_checkpointing is True
    assert config.network.rank == 16 and config.network.alpha == 8.0
    assert config.adapter_path == Path("output/lora.safetensors")


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[training]\nlearnig_rate = 1e-4\n")
    assert error_of(load_config, path) == (
        f"{path}: unknown key 'training.learnig_rate'; did you mean 'training.learning_rate'?")


def test_unknown_section_and_subset_key(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[trainig]\nmax_steps = 3\n")
    assert error_of(load_config, path) == f"{path}: unknown key 'trainig'; did you mean 'training'?"
    path = write(tmp_path, MINIMAL.replace('class_tokens', 'class_token'))
    assert "unknown key 'dataset.subsets[0].class_token'; did you mean 'dataset.subsets[0].class_tokens'?" in error_of(load_config, path)


@pytest.mark.parametrize("line, message", [
    ('max_steps = "100"', "training.max_steps must be an integer, got a string '100'"),
    ("learning_rate = true", "training.learning_rate must be a number, got a boolean True"),
    ('gradient_checkpointing = "yes"', "training.gradient_checkpointing must be a boolean (true or false), got a string 'yes'"),
    ('mixed_precision = "fp8"', "training.mixed_precision must be one of 'no' | 'fp16' | 'bf16', got 'fp8'"),
    ('sample_prompts = "a dog"', "training.sample_prompts: a dog: a sample-prompt file must end in .txt, .toml or .json "
                                 "(kohya's formats)"),
    ("sample_prompts = 3", "training.sample_prompts must be a string or an array of strings, got an integer 3"),
    ('sample_prompts = ["a", 3]', "training.sample_prompts[1] must be a string, got an integer 3"),
    ("max_steps = -5", "training.max_steps must be >= 1, got -5"),
    ("max_steps = 0", "training.max_steps must be >= 1, got 0"),
])
def test_wrong_type_or_range_names_the_expected_type(tmp_path, line, message):
    path = write(tmp_path, MINIMAL + f"\n[training]\n{line}\n")
    assert error_of(load_config, path) == f"{path}: {message}"


def test_rank_zero_and_resolution_not_multiple_of_64(tmp_path):
    assert "network.rank must be >= 1, got 0" in error_of(load_config, write(tmp_path, MINIMAL + "\n[network]\nrank = 0\n"))
    text = MINIMAL.replace("[[dataset.subsets]]", "[dataset]\nresolution = 500\n\n[[dataset.subsets]]")
    assert "dataset.resolution must be a positive multiple of 64, got 500" in error_of(load_config, write(tmp_path, text))


def test_toml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, '[model]\npretrained = "x\n')
    message = error_of(load_config, path)
    assert message.startswith(f"{path}: TOML syntax error:")
    assert "line 2" in message and "column" in message


def test_missing_config_file_and_required_keys(tmp_path):
    assert error_of(load_config, tmp_path / "nope.toml") == f"config file {tmp_path / 'nope.toml'} does not exist"
    path = write(tmp_path, "[training]\nmax_steps = 3\n")
    assert "model.pretrained is required" in error_of(load_config, path)


def test_set_overrides_parse_toml_values_and_bare_strings(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["training.max_steps=7", "noise.offset=0",
                                                   "model.pretrained=/models/my model", "training.sample_prompts=['a', 'b']"])
    assert config.training.max_steps == 7
    assert config.noise.offset == 0.0
    assert config.model.pretrained == "/models/my model"
    assert config.training.sample_prompts == ["a", "b"]
    assert "did you mean 'training.max_steps'" in error_of(load_config, write(tmp_path, MINIMAL), ["training.max_step=7"])
    assert "expected section.key=value" in error_of(load_config, write(tmp_path, MINIMAL), ["max_steps"])


def test_zero_terminal_snr_requires_v_prediction(tmp_path):
    message = error_of(load_config, write(tmp_path, MINIMAL + "\n[noise]\nzero_terminal_snr = true\n"))
    assert 'needs model.prediction_type = "v_prediction"' in message


def test_kohya_folder_naming_sets_repeats_and_tokens(tmp_path):
    text = MINIMAL.replace('image_dir = "imgs"\nclass_tokens = "sks dog"', 'image_dir = "data/10_sks dog"')
    subset = load_config(write(tmp_path, text)).dataset.subsets[0]
    assert (subset.num_repeats, subset.class_tokens) == (10, "sks dog")
    # num_repeats written out wins over the folder's number, 1 included.
    for repeats in (1, 3):
        explicit = text.replace('image_dir = "data/10_sks dog"', f'image_dir = "data/10_sks dog"\nnum_repeats = {repeats}')
        assert load_config(write(tmp_path, explicit)).dataset.subsets[0].num_repeats == repeats


def test_kohya_train_and_reg_data_dir(tmp_path):
    (tmp_path / "train" / "5_sks cat").mkdir(parents=True)
    (tmp_path / "reg" / "1_cat").mkdir(parents=True)
    text = f'[model]\npretrained = "x"\n[dataset]\ntrain_data_dir = "{tmp_path / "train"}"\nreg_data_dir = "{tmp_path / "reg"}"\n'
    subsets = load_config(write(tmp_path, text)).dataset.subsets
    assert [(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg) for s in subsets] == [
        ("5_sks cat", 5, "sks cat", False), ("1_cat", 1, "cat", True)]


def test_a_kohya_folder_with_0_repeats_is_named_with_its_fix(tmp_path, caplog):
    """kohya skips `0_` folders; alone, one is an error naming the folder and the prefix to change."""
    (tmp_path / "train" / "0_cat").mkdir(parents=True)
    config = write(tmp_path, f'[model]\npretrained = "x"\n[dataset]\ntrain_data_dir = "{tmp_path / "train"}"\n')
    assert error_of(load_config, config) == (
        f"{config}: dataset.train_data_dir = '{tmp_path / 'train'}': the folder '0_cat' starts with 0 repeats, so "
        "nothing is trained (the number before '_' is how often each image is used per epoch; kohya skips 0): "
        "rename it, e.g. '1_cat'")
    (tmp_path / "train" / "5_dog").mkdir()
    subsets = load_config(config).dataset.subsets
    assert [Path(s.image_dir).name for s in subsets] == ["5_dog"]
    assert "skipped 1 subfolder(s) named with 0 repeats, as kohya does: 0_cat; to train on one, rename it with " \
           "its repeats per epoch, e.g. 1_cat" in caplog.text
    named = write(tmp_path, MINIMAL.replace('image_dir = "imgs"', 'image_dir = "data/0_cat"'), "named.toml")
    assert error_of(load_config, named) == (
        f"{named}: the image folder 'data/0_cat' starts with 0 repeats, so nothing of it is trained (<repeats>_<class "
        "tokens>: the number before '_' is how often each image is used per epoch): rename it, e.g. '1_cat' (a "
        "subset's num_repeats overrides the folder's number)")
    kept = write(tmp_path, MINIMAL.replace('image_dir = "imgs"', 'image_dir = "data/0_cat"\nnum_repeats = 3'), "kept.toml")
    assert load_config(kept).dataset.subsets[0].num_repeats == 3


def test_kohya_dataset_config_is_accepted(tmp_path):
    dataset = write(tmp_path, """
[general]
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 768
batch_size = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "data/10_sks dog"

  [[datasets.subsets]]
  image_dir = "data/reg"
  class_tokens = "dog"
  is_reg = true
  keep_tokens = 0
""", "dataset.toml")
    config = load_config(write(tmp_path, '[model]\npretrained = "x"\n'), dataset_config=dataset)
    d = config.dataset
    assert (d.resolution, d.batch_size, d.enable_bucket) == (768, 2, True)
    assert [(s.num_repeats, s.class_tokens, s.is_reg, s.shuffle_caption, s.keep_tokens) for s in d.subsets] == [
        (10, "sks dog", False, True, 1), (1, "dog", True, True, 0)]
    bad = write(tmp_path, "[[datasets]]\nresolutoin = 512\n", "bad.toml")
    assert "unknown key 'datasets.resolutoin'; did you mean 'datasets.resolution'?" in error_of(
        load_config, write(tmp_path, '[model]\npretrained = "x"\n'), dataset_config=bad)


def _float_keys() -> list[tuple[str, str, str]]:
    """(section, key, TOML value) of every float-typed config key, found from the dataclasses: keys added
    later are covered without touching this test."""
    import dataclasses
    import typing

    from lora_offset.config import SECTIONS, SubsetConfig

    def holds_float(hint) -> bool:
        return hint is float or any(holds_float(a) for a in typing.get_args(hint))

    keys = []
    for section, cls in [*SECTIONS.items(), ("dataset.subsets", SubsetConfig)]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if holds_float(hints[f.name]):
                hint = hints[f.name]  # a list, or a union with a list arm (Optional[list[float] | str]): give a list
                is_list = typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in typing.get_args(hint))
                keys.append((section, f.name, is_list))
    return keys


FLOAT_KEYS = _float_keys()


def test_there_are_float_keys_to_check():
    assert {("training", "learning_rate", False), ("noise", "offset", False), ("training", "text_encoder_lr", False)} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("section, key, is_list", FLOAT_KEYS, ids=[f"{s}.{k}" for s, k, _ in FLOAT_KEYS])
def test_every_float_key_rejects_nan_and_infinity_naming_the_key(tmp_path, section, key, is_list, literal):
    value = f"[{literal}]" if is_list else literal
    if section == "dataset.subsets":
        path = write(tmp_path, MINIMAL + f"{key} = {value}\n")
        name = f"dataset.subsets[0].{key}"
    else:
        path = write(tmp_path, MINIMAL + f"\n[{section}]\n{key} = {value}\n")
        name = f"{section}.{key}"
    name += "[0]" if is_list else ""
    shown = {"nan": "nan", "inf": "inf", "-inf": "-inf"}[literal]
    assert error_of(load_config, path) == f"{path}: {name} must be a finite number, got {shown}"


def test_free_tables_reject_nan_and_infinity_too(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[training]\noptimizer_args = { betas = [0.9, nan], eps = 1e-8 }\n")
    assert error_of(load_config, path) == f"{path}: training.optimizer_args.betas[1] must be a finite number, got nan"
    path = write(tmp_path, MINIMAL + "\n[training]\noptimizer_args = { d_coef = -inf }\n")
    assert error_of(load_config, path) == f"{path}: training.optimizer_args.d_coef must be a finite number, got -inf"


def test_set_inf_learning_rate_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert error_of(load_config, path, ["training.learning_rate=inf"]) == (
        f"{path}: training.learning_rate must be a finite number, got inf")


def test_config_round_trips_through_to_dict():
    config = Config.from_dict({"model": {"pretrained": "x"}, "dataset": {"subsets": [{"image_dir": "a"}]}})
    assert Config.from_dict(config.to_dict()) == config


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["max_steps", "learning_rate", "seed", "gradient_checkpointing", "output_name"]),
       value=st.one_of(st.integers(-10**6, 10**6), st.floats(), st.booleans(), st.text(max_size=20),
                       st.lists(st.integers(), max_size=3)))
def test_any_training_value_is_accepted_or_rejected_with_a_user_error(key, value):
    """No value of any type crashes validation: it either builds a config or raises one UserError line."""
    data = {"model": {"pretrained": "x"}, "dataset": {"subsets": [{"image_dir": "a"}]}, "training": {key: value}}
    try:
        config = Config.from_dict(data)
    except UserError as e:
        assert "\n" not in str(e) and f"training.{key}" in str(e)
    else:
        assert getattr(config.training, key) == value


def test_sample_sampler_and_prompt_file_are_checked_before_training(tmp_path):
    path = write(tmp_path, MINIMAL + '\n[training]\nsample_sampler = "euler_A"\n')
    assert error_of(load_config, path) == (f"{path}: training.sample_sampler: sampler 'euler_A' is not one of "
                                           "ddim, pndm, lms, k_lms, euler, k_euler, euler_a, k_euler_a, heun, dpm_2, "
                                           "k_dpm_2, dpm_2_a, k_dpm_2_a, dpmsolver, dpmsolver++, dpm++_2m_karras, "
                                           "dpmsingle; did you mean 'euler_a'?")
    ztsnr = "\n[noise]\nzero_terminal_snr = true\n"
    text = MINIMAL.replace('pretrained = "some/model"', 'pretrained = "some/model"\nprediction_type = "v_prediction"')
    path = write(tmp_path, text + ztsnr + '[training]\nsample_sampler = "pndm"\n')
    assert error_of(load_config, path) == (
        f"{path}: training.sample_sampler: sampler 'pndm' cannot sample with noise.zero_terminal_snr = true; use one of "
        "ddim, euler, k_euler, euler_a, k_euler_a, dpmsolver, dpmsolver++, dpm++_2m_karras")
    prompts = write(tmp_path, "a dog --ss heun\n", name="prompts.txt")
    path = write(tmp_path, text + ztsnr + f'[training]\nsample_prompts = "{prompts}"\n')
    assert error_of(load_config, path) == (f"{prompts} line 1: sampler 'heun' cannot sample with "
                                           "noise.zero_terminal_snr = true; use one of ddim, euler, k_euler, euler_a, "
                                           "k_euler_a, dpmsolver, dpmsolver++, dpm++_2m_karras")
    prompts.write_text("a dog --w 96 --ss euler\n", encoding="utf-8")
    config = load_config(path)
    assert config.training.sample_prompts == str(prompts) and config.training.sample_sampler == "ddim"
