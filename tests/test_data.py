"""The dataset stage: captions, repeats, buckets, the deterministic batch schedule, caches."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lora_offset.config import DatasetConfig, SubsetConfig
from lora_offset.training.data import dataset as dataset_module
from lora_offset.training.data.buckets import (bucket_resolutions, center_crop_box, image_bucket, nearest_bucket,
                                               no_upscale_bucket)
from lora_offset.training.data.captions import check_caption_lengths, process_caption
from lora_offset.training.data.dataset import build_dataset
from lora_offset.training.data.images import load_image, to_tensor
from lora_offset.training.data.scan import missing_class_images


def image(path: Path, size=(64, 64), color=(200, 40, 20), seed: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        img = Image.new("RGB", size, color)
    else:
        rng = np.random.default_rng(seed)
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img.save(path)
    return path


def cfg(*subsets: SubsetConfig, **kw) -> DatasetConfig:
    kw.setdefault("resolution", 64)
    return DatasetConfig(subsets=list(subsets), **kw)


def sub(folder: Path, **kw) -> SubsetConfig:
    kw.setdefault("class_tokens", "sks dog")
    return SubsetConfig(image_dir=str(folder), **kw)


def fake_encode(px: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 8x average pool, 4 channels (the 4th is the mean of RGB)."""
    pooled = F.avg_pool2d(px, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * 0.18215


# ---- buckets: pure functions ------------------------------------------------------------------

def test_bucket_resolutions_match_kohya_for_sd15_defaults():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert buckets == [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
                       (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
                       (896, 256), (960, 256), (1024, 256)]
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)


def test_bucket_resolutions_respect_bounds():
    buckets = bucket_resolutions(768, 512, 1024, 128)
    assert (768, 768) in buckets
    assert all(512 <= min(b) and max(b) <= 1024 and b[0] * b[1] <= 768 * 768 for b in buckets)
    assert buckets == [(512, 1024), (640, 896), (768, 768), (896, 640), (1024, 512)]


def test_nearest_bucket_and_no_upscale_bucket():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert nearest_bucket((1000, 500), buckets) == (704, 320)  # 2.2 is nearest 2.0
    assert nearest_bucket((500, 500), buckets) == (512, 512)
    assert nearest_bucket((300, 1000), buckets) == (256, 832)  # 0.3: 0.308 beats 0.286
    assert no_upscale_bucket((100, 200), 512, 64) == (64, 192)  # floored, never enlarged
    assert no_upscale_bucket((2000, 1000), 512, 64) == (704, 320)  # shrunk to 512² area: 724x362
    assert no_upscale_bucket((512, 512), 512, 64) == (512, 512)


def test_center_crop_box():
    assert center_crop_box((200, 100), (64, 64)) == (50.0, 0.0, 150.0, 100.0)
    assert center_crop_box((100, 300), (64, 128)) == (0.0, 50.0, 100.0, 250.0)
    assert center_crop_box((64, 64), (64, 64)) == (0.0, 0.0, 64.0, 64.0)


def test_image_bucket_without_buckets_is_the_square():
    c = cfg(resolution=128)
    assert image_bucket((1000, 300), c) == (128, 128)


# ---- captions -----------------------------------------------------------------------------------

def test_captions_from_files_class_tokens_and_first_line(tmp_path):
    folder = tmp_path / "10_sks dog"
    image(folder / "a.png")
    image(folder / "b.png")
    image(folder / "c.jpg")
    (folder / "a.txt").write_text("\ufeffsks dog, on a beach\nsecond line ignored\n", encoding="utf-8")
    (folder / "c.caption").write_text("sks dog, in snow", encoding="utf-8")
    ds = build_dataset(cfg(sub(folder)), seed=0)
    assert {e.path.name: e.caption for e in ds.entries} == {"a.png": "sks dog, on a beach", "b.png": "sks dog",
                                                            "c.jpg": "sks dog"}
    ds2 = build_dataset(cfg(sub(folder, caption_extension=".caption")), seed=0)
    assert {e.path.name: e.caption for e in ds2.entries}["c.jpg"] == "sks dog, in snow"


def test_latin1_caption_is_read_with_a_warning_naming_the_file(tmp_path, caplog):
    folder = tmp_path / "imgs"
    image(folder / "a.png")
    (folder / "a.txt").write_bytes("sks dog, café crème".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder)), seed=0)
    assert ds.entries[0].caption == "sks dog, café crème"
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["1 caption file(s) are not valid UTF-8 and were read as Latin-1 (save them as UTF-8):\n"
                        f"  {folder / 'a.txt'}"]


def test_empty_caption_files_fall_back_to_class_tokens_with_one_warning(tmp_path, caplog):
    folder = tmp_path / "imgs"
    for name in ("a", "b", "c"):
        image(folder / f"{name}.png")
    (folder / "a.txt").write_text("", encoding="utf-8")
    (folder / "b.txt").write_text("  \n\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder, class_tokens="ohwx cat")), seed=0)
    assert [e.caption for e in ds.entries] == ["ohwx cat"] * 3
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage() == ("2 caption file(s) are empty; their images use the subset's "
                                              f"class_tokens:\n  {folder / 'a.txt'}\n  {folder / 'b.txt'}")


def test_shuffle_caption_keeps_the_first_keep_tokens():
    def shuffled(caption: str, keep_tokens: int, g: torch.Generator) -> str:
        subset = SubsetConfig(image_dir="x", shuffle_caption=True, keep_tokens=keep_tokens)
        return process_caption(caption, subset, g, epoch=1, step=0)

    caption = "sks dog, red collar, grass, sunny, park, bokeh"
    seen = set()
    for k in range(30):
        out = shuffled(caption, 2, torch.Generator().manual_seed(k))
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "red collar"]
        assert sorted(tags) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 5  # it really shuffles
    assert shuffled("only, two", 5, torch.Generator()) == "only, two"
    assert shuffled(" a ,b,  c", 3, torch.Generator()) == "a, b, c"


def test_shuffled_captions_in_batches_are_deterministic(tmp_path):
    folder = tmp_path / "imgs"
    image(folder / "a.png")
    (folder / "a.txt").write_text("sks, t1, t2, t3, t4, t5", encoding="utf-8")
    c = cfg(sub(folder, shuffle_caption=True, keep_tokens=1, num_repeats=4))
    ds1, ds2 = build_dataset(c, seed=3), build_dataset(c, seed=3)
    caps = [ds1.batch(s).captions[0] for s in range(12)]
    assert caps == [ds2.batch(s).captions[0] for s in range(12)]
    assert all(x.startswith("sks, ") for x in caps)
    assert len(set(caps)) > 3
    assert ds1.caption_set() is None
    assert ds1.captions == ["sks, t1, t2, t3, t4, t5"]


def test_caption_set_without_shuffle(tmp_path):
    inst, reg = tmp_path / "inst", tmp_path / "reg"
    image(inst / "a.png")
    image(inst / "b.png")
    (inst / "a.txt").write_text("sks dog, beach", encoding="utf-8")
    image(reg / "r.png")
    ds = build_dataset(cfg(sub(inst), sub(reg, is_reg=True, class_tokens="dog")), seed=0)
    assert ds.caption_set() == ["dog", "sks dog", "sks dog, beach"]
    produced = {c for s in range(10) for c in ds.batch(s).captions}
    assert produced == set(ds.caption_set())


def test_tag_frequency_is_kohya_shaped(tmp_path):
    a, b = tmp_path / "10_sks dog", tmp_path / "1_dog"
    for name, caption in (("x", "sks dog, Beach, sunny"), ("y", "sks dog, beach"), ("z", None)):
        image(a / f"{name}.png")
        if caption:
            (a / f"{name}.txt").write_text(caption, encoding="utf-8")
    image(b / "r1.png")
    image(b / "r2.png")
    ds = build_dataset(cfg(sub(a, num_repeats=10), sub(b, is_reg=True, class_tokens="dog")), seed=0)
    assert ds.tag_frequency == {"10_sks dog": {"sks dog": 3, "beach": 2, "sunny": 1}, "1_dog": {"dog": 2}}
    assert ds.dataset_dirs == {"10_sks dog": {"n_repeats": 10, "img_count": 3}, "1_dog": {"n_repeats": 1, "img_count": 2}}
    assert (ds.num_instance_images, ds.num_reg_images, ds.num_train_items) == (3, 2, 30)


def test_check_caption_lengths_warns_about_long_captions(tmp_path, caplog):
    from transformers import CLIPTokenizer

    from lora_offset.tiny import write_tiny_tokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path / "tok")))
    short, long = "sks dog", "a" * 120  # the tiny tokenizer is character-level
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        assert check_caption_lengths([short, long, long], tok) == [long]
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert msg.startswith("1 caption(s) are longer than 75 tokens; the text encoder sees only the first 75; "
                          "training.max_token_length = 150 or 225 lets it see more:\n  (")
    assert msg.endswith(f" tokens) {long}")
    caplog.clear()
    assert check_caption_lengths([short], tok) == []
    assert check_caption_lengths([], tok) == []
    assert caplog.records == []


# ---- repeats, buckets and the batch schedule ---------------------------------------------------

def test_kohya_repeats_set_the_epoch(tmp_path):
    folder = tmp_path / "10_sks dog"
    for k in range(3):
        image(folder / f"{k}.png", seed=k)
    ds = build_dataset(cfg(sub(folder, num_repeats=10), batch_size=2), seed=1)
    assert ds.num_train_items == 30 and ds.steps_per_epoch == 15
    counts: dict[str, int] = {}
    for step in range(15):
        for p in ds.batch(step).paths:
            counts[p.name] = counts.get(p.name, 0) + 1
    assert counts == {"0.png": 10, "1.png": 10, "2.png": 10}
    # the next epoch is another permutation of the same items
    e0 = [ds.batch_plan(s)[0] for s in range(15)]
    e1 = [ds.batch_plan(15 + s)[0] for s in range(15)]
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) and e0 != e1


def test_batches_stay_within_one_bucket(tmp_path):
    folder = tmp_path / "imgs"
    sizes = [(256, 90), (250, 80), (90, 256), (80, 250), (200, 200), (190, 190), (300, 80)]
    for k, size in enumerate(sizes):
        image(folder / f"{k}.png", size=size, seed=k)
    c = cfg(sub(folder), resolution=128, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256,
            bucket_reso_steps=64, batch_size=2)
    ds = build_dataset(c, seed=0)
    # buckets: (64,192) (64,256) (128,128) (192,64) (256,64); nearest aspect ratio wins
    assert ds.bucket_counts == {(64, 192): 2, (128, 128): 2, (192, 64): 2, (256, 64): 1}
    assert ds.steps_per_epoch == 4
    for step in range(ds.steps_per_epoch * 2):
        b = ds.batch(step)
        buckets = {ds.entries[ds.batch_plan(step)[0][0]].bucket}
        w, h = buckets.pop()
        assert b.pixel_values.shape[1:] == (3, h, w)
        assert b.pixel_values.dtype == torch.float32
        assert -1.0 <= b.pixel_values.min() and b.pixel_values.max() <= 1.0


def test_bucket_no_upscale_keeps_small_images_small(tmp_path):
    folder = tmp_path / "imgs"
    image(folder / "small.png", size=(100, 70), seed=0)
    image(folder / "big.png", size=(1000, 1000), seed=1)
    c = cfg(sub(folder), resolution=256, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=512,
            bucket_no_upscale=True)
    ds = build_dataset(c, seed=0)
    assert {e.path.name: e.bucket for e in ds.entries} == {"small.png": (64, 64), "big.png": (256, 256)}


def test_no_bucket_resize_and_center_crop(tmp_path):
    folder = tmp_path / "imgs"
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[:, :64] = (255, 0, 0)
    arr[:, 64:128] = (0, 255, 0)
    arr[:, 128:] = (0, 0, 255)
    folder.mkdir()
    Image.fromarray(arr).save(folder / "wide.png")
    ds = build_dataset(cfg(sub(folder)), seed=0)
    px = ds.batch(0).pixel_values[0]
    assert px.shape == (3, 64, 64)
    # the centre third (green) survives the crop
    assert torch.allclose(px[:, :, 8:56].mean((1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)


def test_batch_is_a_pure_function_of_seed_and_step(tmp_path):
    inst, reg = tmp_path / "inst", tmp_path / "reg"
    for k in range(5):
        image(inst / f"{k}.png", seed=k)
    for k in range(3):
        image(reg / f"r{k}.png", seed=100 + k)
    c = cfg(sub(inst, num_repeats=2, flip_aug=True), sub(reg, is_reg=True, class_tokens="dog"), batch_size=2)
    a, b = build_dataset(c, seed=7), build_dataset(c, seed=7)
    steps = [11, 0, 5, 3, 17, 4]
    in_order = {s: a.batch(s) for s in sorted(steps)}
    for s in steps:  # out of order, fresh object: same batch
        x, y = in_order[s], b.batch(s)
        assert x.captions == y.captions and x.paths == y.paths
        assert torch.equal(x.pixel_values, y.pixel_values) and torch.equal(x.is_reg, y.is_reg)
    other = build_dataset(c, seed=8)
    assert [other.batch_plan(s) for s in range(10)] != [a.batch_plan(s) for s in range(10)]


def test_every_batch_has_instance_then_as_many_class_images(tmp_path):
    inst, reg = tmp_path / "inst", tmp_path / "reg"
    for k in range(3):
        image(inst / f"{k}.png", size=(192, 64), seed=k)
    for k in range(4):
        image(reg / f"r{k}.png", size=(64, 64), seed=50 + k)
    c = cfg(sub(inst, num_repeats=3), sub(reg, is_reg=True, class_tokens="dog"), batch_size=2,
            resolution=128, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)
    ds = build_dataset(c, seed=0)
    assert ds.steps_per_epoch == 5  # 9 items in batches of 2
    used: dict[str, int] = {}
    for step in range(ds.steps_per_epoch * 4):
        b = ds.batch(step)
        n = len(b) // 2
        assert b.is_reg.tolist() == [False] * n + [True] * n
        assert all(p.parent == inst for p in b.paths[:n]) and all(p.parent == reg for p in b.paths[n:])
        assert b.captions[n:] == ["dog"] * n
        assert b.pixel_values.shape[2:] == (64, 192)  # class images at the instance bucket
        for p in b.paths[n:]:
            used[p.name] = used.get(p.name, 0) + 1
    assert sum(used.values()) == 36 and sorted(used.values()) == [9, 9, 9, 9]  # an even stream


def test_flip_aug_is_seeded_by_step(tmp_path):
    folder = tmp_path / "imgs"
    image(folder / "a.png", seed=0)
    c = cfg(sub(folder, flip_aug=True, num_repeats=1))
    ds = build_dataset(c, seed=0)
    plain = to_tensor(load_image(folder / "a.png"))
    flips = []
    for step in range(20):
        px = ds.batch(step).pixel_values[0]
        assert torch.equal(px, plain) or torch.equal(px, plain.flip(-1))
        flips.append(torch.equal(px, plain.flip(-1)))
    assert 3 <= sum(flips) <= 17
    again = build_dataset(c, seed=0)
    assert flips == [torch.equal(again.batch(s).pixel_values[0], plain.flip(-1)) for s in range(20)]
    no_flip = build_dataset(cfg(sub(folder)), seed=0)
    assert all(torch.equal(no_flip.batch(s).pixel_values[0], plain) for s in range(20))


# ---- latent cache --------------------------------------------------------------------------------

def _two_subset_cfg(tmp_path, flip=True):
    inst, reg = tmp_path / "inst", tmp_path / "reg"
    image(inst / "a.png", size=(192, 64), seed=1)  # bucket (192, 64)
    image(inst / "b.png", size=(64, 64), seed=2)  # bucket (128, 128)
    image(reg / "r.png", size=(64, 64), seed=3)
    return cfg(sub(inst, flip_aug=flip, num_repeats=2), sub(reg, is_reg=True, class_tokens="dog"),
               resolution=128, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)


class CountingEncoder:
    def __init__(self):
        self.images = 0

    def __call__(self, px):
        self.images += px.shape[0]
        return fake_encode(px)


def test_cache_latents_in_memory_matches_encoding_the_batch(tmp_path, monkeypatch):
    c = _two_subset_cfg(tmp_path)
    ds, ref = build_dataset(c, seed=4), build_dataset(c, seed=4)
    steps = range(ds.steps_per_epoch * 3)
    expected_latents = [fake_encode(ref.batch(step).pixel_values) for step in steps]
    enc = CountingEncoder()
    ds.cache_latents(enc)
    # instance: a and b, both flips = 4; class r at both instance buckets = 2
    assert enc.images == 6 and ds.latents_cached
    monkeypatch.setattr(dataset_module, "load_image", lambda *a, **k: pytest.fail("decoded an image after caching"))
    for step, expected in zip(steps, expected_latents):
        b = ds.batch(step)
        assert b.pixel_values is None
        assert b.latents.shape == expected.shape
        assert torch.allclose(b.latents, expected, atol=1e-6)


def test_cache_latents_on_disk_is_reused_until_the_image_changes(tmp_path):
    c = _two_subset_cfg(tmp_path)
    cache = tmp_path / "cache"
    first = CountingEncoder()
    build_dataset(c, seed=0).cache_latents(first, cache_dir=cache, encoder_id="vae-1")
    assert first.images == 6
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 3 and not list(cache.glob("*.tmp"))

    second = CountingEncoder()
    ds = build_dataset(c, seed=0)
    ds.cache_latents(second, cache_dir=cache, encoder_id="vae-1")
    assert second.images == 0
    ref = build_dataset(c, seed=0)
    assert torch.allclose(ds.batch(1).latents, fake_encode(ref.batch(1).pixel_values), atol=1e-6)

    a = tmp_path / "inst" / "a.png"
    image(a, size=(192, 64), seed=99)  # new content, new mtime/size
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = CountingEncoder()
    build_dataset(c, seed=0).cache_latents(third, cache_dir=cache, encoder_id="vae-1")
    assert third.images == 2  # only a.png, both flips

    fourth = CountingEncoder()
    build_dataset(c, seed=0).cache_latents(fourth, cache_dir=cache, encoder_id="vae-2")
    assert fourth.images == 6  # another VAE: everything again


def test_cache_latents_rejects_a_wrong_encoder_shape(tmp_path):
    ds = build_dataset(_two_subset_cfg(tmp_path), seed=0)
    with pytest.raises(ValueError, match=r"encode returned shape \(1, 3, 8, 24\), expected \(1, 4, 8, 24\)"):
        ds.cache_latents(lambda px: F.avg_pool2d(px, 8), batch_size=1)


# ---- class images -------------------------------------------------------------------------------

def test_missing_class_images(tmp_path):
    reg = tmp_path / "reg"
    s = sub(reg, is_reg=True, class_tokens="dog", num_class_images=5)
    assert missing_class_images(s) == 5  # folder not there yet
    image(reg / "1.png")
    image(reg / "2.jpg")
    (reg / "bad.png").write_bytes(b"")
    (reg / "notes.txt").write_text("x")
    assert missing_class_images(s) == 3
    for k in range(5):
        image(reg / f"x{k}.png")
    assert missing_class_images(s) == 0


def test_reg_subset_waiting_for_generated_images_is_not_an_error(tmp_path):
    inst = tmp_path / "inst"
    image(inst / "a.png")
    c = cfg(sub(inst), sub(tmp_path / "reg", is_reg=True, class_tokens="dog", num_class_images=4))
    ds = build_dataset(c, seed=0)
    assert ds.num_reg_images == 0 and ds.batch(0).is_reg.tolist() == [False]


# ---- properties of the pure functions ----------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(res=st.integers(1, 16), lo=st.integers(1, 16), span=st.integers(0, 16), step=st.sampled_from([64, 128]),
       w=st.integers(64, 4000), h=st.integers(64, 4000))
def test_bucket_properties(res, lo, span, step, w, h):
    res, lo = res * 64, lo * 64
    hi = lo + span * 64
    if step > res:  # refused by validate_dataset_config
        return
    buckets = bucket_resolutions(res, lo, hi, step)
    square = res // step * step
    assert (square, square) in buckets
    for bw, bh in buckets:
        assert bw * bh <= res * res and bw % 64 == 0 and bh % 64 == 0 and (bh, bw) in buckets
        if (bw, bh) != (square, square):
            assert lo <= bw <= hi and lo <= bh <= hi
    best = nearest_bucket((w, h), buckets)
    assert all(abs(best[0] / best[1] - w / h) <= abs(b[0] / b[1] - w / h) for b in buckets)
    nw, nh = no_upscale_bucket((w, h), res, step)
    assert nw % step == 0 and nh % step == 0
    assert (nw <= max(w, step)) and (nh <= max(h, step))
    left, top, right, bottom = center_crop_box((w, h), best)
    assert 0 <= left and 0 <= top and right <= w + 1e-9 and bottom <= h + 1e-9
    assert abs((right - left) / (bottom - top) - best[0] / best[1]) < 1e-9
    assert abs(left - (w - right)) < 1e-9 and abs(top - (h - bottom)) < 1e-9
