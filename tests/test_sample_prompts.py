"""kohya's sample-prompt files: line options, comments, .toml and .json, errors naming file and line."""

import json
import logging
import re

import pytest

from lora_offset.errors import UserError
from lora_offset.formats.sample_prompts import (SamplePrompt, parse_prompt_json, parse_prompt_line, parse_prompt_text,
                                                parse_prompt_toml, prompts_from_config, read_sample_prompts, resolve)

# The example of kohya's docs (docs/train_network_advanced.md), verbatim.
KOHYA_EXAMPLE = """\
# prompt 1
masterpiece, best quality, (1girl), in white shirts, upper body, looking at viewer, simple background --n low quality, worst quality, bad anatomy,bad composition, poor, low effort --w 768 --h 768 --d 1 --l 7.5 --s 28

# prompt 2
masterpiece, best quality, 1boy, in business suit, standing at street, looking back --n (low quality, worst quality), bad anatomy,bad composition, poor, low effort --w 576 --h 832 --d 2 --l 5.5 --s 40
"""


def test_kohyas_documented_example():
    first, second = parse_prompt_text(KOHYA_EXAMPLE, "prompts.txt")
    assert first == SamplePrompt(
        prompt="masterpiece, best quality, (1girl), in white shirts, upper body, looking at viewer, simple background",
        negative_prompt="low quality, worst quality, bad anatomy,bad composition, poor, low effort",
        width=768, height=768, seed=1, guidance_scale=7.5, steps=28, where="prompts.txt line 2")
    assert second.negative_prompt == "(low quality, worst quality), bad anatomy,bad composition, poor, low effort"
    assert (second.width, second.height, second.seed, second.guidance_scale, second.steps) == (576, 832, 2, 5.5, 40)
    assert second.where == "prompts.txt line 5"


def test_a_line_without_options_is_all_prompt():
    assert parse_prompt_line("a photo of sks dog") == SamplePrompt(prompt="a photo of sks dog")
    # Only " --" separates options (kohya splits on it): these dashes belong to the prompt.
    assert parse_prompt_line("a--b, x-y").prompt == "a--b, x-y"
    assert parse_prompt_line("--n not an option at the start").prompt == "--n not an option at the start"


def test_option_names_are_case_insensitive_and_the_last_one_wins():
    p = parse_prompt_line("dog --W 640 --H 384 --N ugly --D 7 --L 3 --S 9 --SS Euler_a --w 512")
    assert (p.width, p.height, p.negative_prompt, p.seed, p.guidance_scale, p.steps, p.sampler) == (
        512, 384, "ugly", 7, 3.0, 9, "Euler_a")


def test_steps_are_clamped_as_kohya_does():
    assert parse_prompt_line("dog --s 0").steps == 1
    assert parse_prompt_line("dog --s 5000").steps == 1000


@pytest.mark.parametrize("text, value", [("7", 7.0), ("7.5", 7.5), (".5", 0.5), ("7.", 7.0), ("0", 0.0)])
def test_guidance_scale_numbers(text, value):
    assert parse_prompt_line(f"dog --l {text}").guidance_scale == value


def test_sampler_option():
    assert parse_prompt_line("dog --ss dpmsolver++").sampler == "dpmsolver++"


@pytest.mark.parametrize("line, message", [
    ("dog --w 512px", "--w needs a whole number, got '512px'"),
    ("dog --w -64", "--w needs a whole number, got '-64'"),
    ("dog --d 1.5", "--d needs a whole number, got '1.5'"),
    ("dog --l 7.5.1", "--l needs a number, got '7.5.1'"),
    ("dog --l high", "--l needs a number, got 'high'"),
    ("dog --s", "--s needs a whole number, got ''"),
    ("dog --n", "--n needs a value"),
    ("dog --wd 512", "unknown option --wd (did you mean --w?); options are --n, --w, --h, --d, --s, --l, --ss"),
    ("dog --width 512", "unknown option --width"),
    ("dog -- cat", "unknown option --"),
    ("dog --", "unknown option --"),
])
def test_a_bad_option_is_one_error_naming_file_and_line(line, message):
    with pytest.raises(UserError) as e:
        parse_prompt_text(f"# header\n\nfine --w 512\n{line}\n", "my prompts.txt")
    assert str(e.value).startswith(f"my prompts.txt line 4: {message}")


def test_other_model_families_options_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        p = parse_prompt_line("dog --g 3.5 --cn pose.png --ctr 0.3 --rcfg 1 --fs 3 --w 512", "p.txt line 1")
    assert p == SamplePrompt(prompt="dog", width=512, where="p.txt line 1")
    assert "p.txt line 1: --g is not used for SD 1.x sample images" in caplog.text
    assert sum("is not used" in r.message for r in caplog.records) == 5


def test_comments_blank_lines_and_line_numbers():
    text = "#comment\n\n   \n  # indented: kohya reads this as a prompt\nreal prompt --d 3\r\n\t\nlast"
    prompts = parse_prompt_text(text, "p.txt")
    assert [p.prompt for p in prompts] == ["# indented: kohya reads this as a prompt", "real prompt", "last"]
    assert [p.where for p in prompts] == ["p.txt line 4", "p.txt line 5", "p.txt line 7"]
    assert prompts[1].seed == 3


TOML = """\
[prompt]
width = 512
height = 512
sample_steps = 12
scale = 6
negative_prompt = "lowres"

[[prompt.subset]]
prompt = "a dog"
seed = 1

[[prompt.subset]]
prompt = "a cat"
width = 768
sample_sampler = "euler_a"
"""


def test_toml_prompt_file_defaults_and_subsets():
    import tomllib

    dog, cat = parse_prompt_toml(tomllib.loads(TOML), "p.toml")
    assert dog == SamplePrompt(prompt="a dog", negative_prompt="lowres", width=512, height=512, seed=1, steps=12,
                               guidance_scale=6.0, where="p.toml [[prompt.subset]] 1")
    assert (cat.prompt, cat.width, cat.height, cat.sampler, cat.seed) == ("a cat", 768, 512, "euler_a", None)


@pytest.mark.parametrize("text, message", [
    ('[prompt]\nwidth = 1\n', "p.toml: [prompt] has no [[prompt.subset]] tables"),
    ('[other]\n', "p.toml: a TOML prompt file has one [prompt] table"),
    ('[prompt]\n[[prompt.subset]]\nprompt = "a"\nwidht = 5\n',
     "p.toml [[prompt.subset]] 1: unknown key 'widht' (did you mean width?)"),
    ('[prompt]\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nseed = 3\n', "p.toml [[prompt.subset]] 2: has no 'prompt'"),
    ('[prompt]\n[[prompt.subset]]\nprompt = "a"\nwidth = "512"\n', "p.toml [[prompt.subset]] 1: " "width must be a whole number >= 0, got '512'"),
    ('[prompt]\n[[prompt.subset]]\nprompt = "a"\nsample_steps = 0\n', "p.toml [[prompt.subset]] 1: " "sample_steps must be >= 1, got 0"),
    ('[prompt]\n[[prompt.subset]]\nprompt = "a"\nscale = true\n', "p.toml [[prompt.subset]] 1: " "scale must be a number >= 0, got True"),
    ('[prompt]\n[[prompt.subset]]\nprompt = 5\n', "p.toml [[prompt.subset]] 1: " "prompt must be a string, got 5"),
])
def test_toml_errors(text, message):
    import tomllib

    with pytest.raises(UserError, match="^" + re.escape(message)):
        parse_prompt_toml(tomllib.loads(text), "p.toml")


def test_json_prompt_file_mixes_lines_and_objects(caplog):
    data = ["a dog --w 640 --d 5", {"prompt": "a cat", "negative_prompt": "blurry", "sample_steps": 4, "scale": 3.5,
                                    "guidance_scale": 3.5}]
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        dog, cat = parse_prompt_json(data, "p.json")
    assert (dog.prompt, dog.width, dog.seed, dog.where) == ("a dog", 640, 5, "p.json item 1")
    assert cat == SamplePrompt(prompt="a cat", negative_prompt="blurry", steps=4, guidance_scale=3.5, where="p.json item 2")
    assert "p.json item 2: 'guidance_scale' is not used" in caplog.text
    with pytest.raises(UserError, match=r"^p\.json item 2: expected a prompt line or an object, got 3"):
        parse_prompt_json(["ok", 3], "p.json")
    with pytest.raises(UserError, match=r"^p\.json: a JSON prompt file is an array"):
        parse_prompt_json({"prompt": "a"}, "p.json")
    with pytest.raises(UserError, match=r"^p\.json item 1: unknown option --q"):
        parse_prompt_json(["a --q 1"], "p.json")


def test_read_sample_prompts_by_extension(tmp_path):
    (tmp_path / "p.txt").write_text(KOHYA_EXAMPLE, encoding="utf-8")
    (tmp_path / "p.toml").write_text(TOML, encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(["a --w 64"]), encoding="utf-8")
    assert len(read_sample_prompts(tmp_path / "p.txt")) == 2
    assert [p.prompt for p in read_sample_prompts(tmp_path / "p.toml")] == ["a dog", "a cat"]
    assert read_sample_prompts(tmp_path / "p.json")[0].width == 64
    assert read_sample_prompts(str(tmp_path / "p.txt"))[0].where == f"{tmp_path / 'p.txt'} line 2"


def test_read_sample_prompts_errors(tmp_path):
    def error(name, content=None):
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(UserError) as e:
            read_sample_prompts(path)
        return str(e.value).replace(str(tmp_path) + "/", "")

    assert error("p.md", b"a") == "p.md: a sample-prompt file must end in .txt, .toml or .json (kohya's formats)"
    assert error("missing.txt") == "missing.txt: sample-prompt file does not exist"
    assert error("empty.txt", b"# only a comment\n\n") == "empty.txt: has no prompt (only empty and # comment lines)"
    assert error("latin1.txt", "caf\xe9".encode("latin-1")).startswith("latin1.txt: not UTF-8 text")
    assert error("bad.toml", b"[prompt\n").startswith("bad.toml: TOML syntax error:")
    assert error("bad.json", b'["a",\n  ]').startswith("bad.json: JSON syntax error: ")
    assert "(line 2, column 3)" in error("bad2.json", b'["a",\n  ]')


def test_prompts_from_config_takes_lines_or_a_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a --d 9\n", encoding="utf-8")
    assert prompts_from_config(str(path), "c.toml")[0].seed == 9
    assert prompts_from_config(["a --w 128", "b"], "c.toml")[0] == SamplePrompt(
        prompt="a", width=128, where="c.toml: training.sample_prompts[0]")
    assert prompts_from_config([], "c.toml") == []
    with pytest.raises(UserError, match=r"^c\.toml: training\.sample_prompts\[1\]: unknown option --x"):
        prompts_from_config(["a", "b --x 1"], "c.toml")
    with pytest.raises(UserError, match=r"^c\.toml: training\.sample_prompts: .*nope\.txt: sample-prompt file does not exist"):
        prompts_from_config(str(tmp_path / "nope.txt"), "c.toml")


def test_resolve_fills_defaults_and_rounds_sizes():
    prompts = [SamplePrompt("a"), SamplePrompt("b", negative_prompt="x", width=500, height=30, seed=77, steps=3,
                                             guidance_scale=1.5, sampler="euler")]
    a, b = resolve(prompts, width=512, height=256, seed=42, steps=20, guidance_scale=7.5, sampler="ddim")
    assert a == SamplePrompt("a", negative_prompt="", width=512, height=256, seed=42, steps=20, guidance_scale=7.5,
                             sampler="ddim")
    assert b == SamplePrompt("b", negative_prompt="x", width=496, height=64, seed=77, steps=3, guidance_scale=1.5,
                             sampler="euler")
    assert [p.seed for p in resolve([SamplePrompt("x")] * 3, width=64, height=64, seed=5, steps=1,
                                    guidance_scale=1, sampler="ddim")] == [5, 6, 7]
    assert prompts[0].width is None  # pure: the input is untouched


def test_training_reads_the_prompt_file_at_each_sampling(tmp_path, caplog):
    from lora_offset.config import Config
    from lora_offset.training.samples import sample_prompts, write_samples

    path = tmp_path / "prompts.txt"
    path.write_text("a dog --w 128\n", encoding="utf-8")
    config = Config.from_dict({"model": {"pretrained": "x"}, "dataset": {"resolution": 64, "subsets": [{"image_dir": "i"}]},
                               "training": {"sample_prompts": str(path), "sample_sampler": "euler", "seed": 3}})
    assert sample_prompts(config) == [SamplePrompt("a dog", negative_prompt="", width=128, height=64, seed=3, steps=20,
                                                   guidance_scale=7.5, sampler="euler", where=f"{path} line 1")]
    path.write_text("a dog --w 128\na cat --ss dpmsolver++\n", encoding="utf-8")  # edited during training
    assert [(p.prompt, p.seed, p.sampler) for p in sample_prompts(config)] == [("a dog", 3, "euler"),
                                                                               ("a cat", 4, "dpmsolver++")]
    path.write_text("a dog --w big\n", encoding="utf-8")  # broken during training: no samples, training goes on
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        assert write_samples(config, None, None, None, 7) is None
    assert f"no sample images at step 7: config: training.sample_prompts: {path} line 1: --w needs a whole number" in caplog.text
