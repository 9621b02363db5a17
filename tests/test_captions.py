"""kohya's caption options, one by one (process_caption), and the text-embedding cache they allow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lora_offset.config import DatasetConfig, SubsetConfig
from lora_offset.training.data.captions import process_caption
from lora_offset.training.data.dataset import build_dataset


def subset(**kw) -> SubsetConfig:
    return SubsetConfig(image_dir="x", **kw)


def run(caption: str, seed: int = 0, epoch: int = 1, step: int = 0, max_steps: int | None = None, **kw) -> str:
    return process_caption(caption, subset(**kw), torch.Generator().manual_seed(seed), epoch=epoch, step=step,
                           max_steps=max_steps)


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_defaults_leave_the_caption_alone():
    assert run("sks dog, red collar|||x") == "sks dog, red collar|||x"


def test_prefix_and_suffix():
    assert run("red collar", caption_prefix="sks dog,", caption_suffix=", photo") == "sks dog, red collar , photo"


def test_caption_dropout_rate_within_binomial_bounds():
    n, rate = 4000, 0.3
    dropped = sum(run("sks dog, grass", seed=k, caption_dropout_rate=rate) == "" for k in range(n))
    assert within_binomial(dropped, n, rate), dropped
    assert all(run("a", seed=k, caption_dropout_rate=1.0) == "" for k in range(20))
    assert all(run("a", seed=k, caption_dropout_rate=0.0) == "a" for k in range(20))


def test_caption_dropout_every_n_epochs_drops_whole_epochs():
    assert [run("a", epoch=e, caption_dropout_every_n_epochs=2) for e in range(1, 6)] == ["a", "", "a", "", "a"]


def test_tag_dropout_within_binomial_bounds_and_keeps_the_kept_tags():
    tags = [f"t{i}" for i in range(20)]
    caption = ", ".join(["sks dog"] + tags)
    n_captions, rate = 300, 0.25
    kept = 0
    for k in range(n_captions):
        out = run(caption, seed=k, keep_tokens=1, caption_tag_dropout_rate=rate).split(", ")
        assert out[0] == "sks dog"  # keep_tokens are never dropped
        assert out[1:] == [t for t in tags if t in out[1:]]  # order kept (no shuffle asked)
        kept += len(out) - 1
    assert within_binomial(n_captions * 20 - kept, n_captions * 20, rate)


def test_keep_tokens_separator_keeps_a_head_and_a_tail():
    caption = "sks dog, solo ||| a, b, c, d ||| masterpiece, best"
    for k in range(10):
        out = run(caption, seed=k, shuffle_caption=True, keep_tokens_separator="|||").split(", ")
        assert out[0] == "sks dog" and out[-2:] == ["masterpiece", "best"] and out[1] == "solo"
        assert sorted(out[2:-2]) == ["a", "b", "c", "d"]


def test_caption_separator_and_secondary_separator():
    out = run("sks dog; red collar; grass", shuffle_caption=True, keep_tokens=1, caption_separator=";")
    assert out.startswith("sks dog, ") and sorted(out.split(", ")[1:]) == ["grass", "red collar"]
    # the secondary separator joins words into one tag for shuffling, then becomes the separator
    for k in range(10):
        out = run("sks, red;;collar, green;;grass", seed=k, shuffle_caption=True, keep_tokens=1,
                  secondary_separator=";;")
        assert out in ("sks, red,collar, green,grass", "sks, green,grass, red,collar")


def test_wildcards_pick_lines_and_options():
    caption = "a {red|blue} dog\na {{literal}} cat"
    seen = {run(caption, seed=k, enable_wildcard=True) for k in range(60)}
    assert seen == {"a red dog", "a blue dog", "a {literal} cat"}
    assert run(caption) == "a {red|blue} dog"  # without enable_wildcard: the first line as is


def test_token_warmup_grows_the_tags():
    caption = ", ".join(f"t{i}" for i in range(10))
    counts = [len(run(caption, step=s, token_warmup_step=10, token_warmup_min=2).split(", ")) for s in (0, 5, 9, 10)]
    assert counts == [2, 6, 9, 10]  # floor(step * (10 - 2) / 10) + 2, all from step 10 on
    # a fraction of the training: 0.5 of 20 steps = 10 steps
    assert len(run(caption, step=5, max_steps=20, token_warmup_step=0.5, token_warmup_min=2).split(", ")) == 6


# ---- the dataset and the text-embedding cache -------------------------------------------------------


def images(folder, captions: list[str]):
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def dataset(folder, batch_size=2, **kw):
    return build_dataset(DatasetConfig(resolution=64, batch_size=batch_size,
                                       subsets=[SubsetConfig(image_dir=str(folder), **kw)]), seed=0)


def test_cache_holds_every_caption_a_batch_can_carry_with_dropout(tmp_path):
    folder = images(tmp_path / "a", ["sks dog, grass", "sks dog, sofa", "sks dog, park"])
    ds = dataset(folder, caption_dropout_rate=0.5, caption_prefix="photo of", caption_dropout_every_n_epochs=3)
    cached = set(ds.caption_set())
    assert cached == {"", "photo of sks dog, grass", "photo of sks dog, sofa", "photo of sks dog, park"}
    seen = {c for step in range(60) for c in ds.batch(step).captions}
    assert seen == cached  # each one is used, and nothing outside the cache
    # epoch 3 (batches 4 and 5 with 2 batches per epoch) has every caption dropped
    assert ds.steps_per_epoch == 2
    assert all(c == "" for step in (4, 5) for c in ds.batch(step).captions)


@pytest.mark.parametrize("option", [{"shuffle_caption": True}, {"enable_wildcard": True},
                                    {"caption_tag_dropout_rate": 0.1}, {"token_warmup_step": 5}])
def test_captions_that_change_from_use_to_use_are_not_cached(tmp_path, option):
    folder = images(tmp_path / "a", ["sks dog, grass", "sks dog, {red|blue} sofa"])
    assert dataset(folder, **option).caption_set() is None
    assert dataset(folder).caption_set() == ["sks dog, grass", "sks dog, {red|blue} sofa"]


def test_multi_line_caption_files_with_wildcards(tmp_path):
    folder = images(tmp_path / "a", ["first line\n\nsecond {a|b}\n"])
    assert [e.caption for e in dataset(folder, enable_wildcard=True).entries] == ["first line\nsecond {a|b}"]
    assert [e.caption for e in dataset(folder).entries] == ["first line"]
    ds = dataset(folder, batch_size=1, enable_wildcard=True)
    assert {ds.batch(s).captions[0] for s in range(40)} == {"first line", "second a", "second b"}
    assert ds.captions == ["first line", "second {a|b}"]  # the length check sees each line


def test_kohya_dataset_config_takes_the_caption_keys_by_kohyas_names(tmp_path):
    from lora_offset.config import load_config

    (tmp_path / "img").mkdir()
    (tmp_path / "train.toml").write_text('[model]\npretrained = "m"\n', encoding="utf-8")
    (tmp_path / "data.toml").write_text(f"""
[general]
caption_dropout_rate = 0.1
caption_tag_dropout_rate = 0.05
[[datasets]]
resolution = 512
[[datasets.subsets]]
image_dir = '{tmp_path / "img"}'
class_tokens = "sks dog"
keep_tokens_separator = "|||"
secondary_separator = ";;;"
caption_prefix = "photo"
enable_wildcard = true
token_warmup_step = 0.25
caption_dropout_every_n_epochs = 3
""", encoding="utf-8")
    s = load_config(tmp_path / "train.toml", dataset_config=tmp_path / "data.toml").dataset.subsets[0]
    assert (s.caption_dropout_rate, s.caption_tag_dropout_rate, s.keep_tokens_separator, s.secondary_separator,
            s.caption_prefix, s.enable_wildcard, s.token_warmup_step, s.caption_dropout_every_n_epochs) == (
        0.1, 0.05, "|||", ";;;", "photo", True, 0.25, 3)
