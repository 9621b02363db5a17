"""Malformed inputs: each ends in a listed skip, a correct image, or a one-line UserError; never a traceback.

The texts users see are pinned here: change them on purpose or not at all.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_offset.config import DatasetConfig, SubsetConfig
from lora_offset.errors import UserError
from lora_offset.training.data.dataset import build_dataset
from lora_offset.training.data.images import load_image


def cfg(*subsets, **kw) -> DatasetConfig:
    kw.setdefault("resolution", 64)
    return DatasetConfig(subsets=list(subsets), **kw)


def sub(folder: Path, **kw) -> SubsetConfig:
    kw.setdefault("class_tokens", "sks dog")
    return SubsetConfig(image_dir=str(folder), **kw)


def noise_image(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    noise_image().save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (900 M, ten times Pillow's limit)."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def png_with_bad_crc() -> bytes:
    raw = bytearray(encoded("PNG"))
    raw[raw.index(b"IDAT") + 20] ^= 0xFF
    return bytes(raw)


def small(size, fmt="PNG") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, fmt)
    return buf.getvalue()


def half(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


TRUNCATED = "truncated or corrupt ("
NOT_IMAGE = "not an image (Pillow cannot identify the file's format)"
BOMB = "too large: more pixels than Pillow's decompression-bomb limit of 89,478,485; downscale it"

# file name -> (content, expected reason: exact, or a prefix when it ends with "(")
UNREADABLE = {
    "empty.png": (lambda: b"", "empty file (0 bytes)"),
    "empty.jpg": (lambda: b"", "empty file (0 bytes)"),
    "text named.png": (lambda: b"hello, I am a text file\n", NOT_IMAGE),
    "page.jpeg": (lambda: b"<html><body>404 Not Found</body></html>", NOT_IMAGE),
    "random.webp": (lambda: bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)), NOT_IMAGE),
    "truncated.jpg": (lambda: half(encoded("JPEG")), TRUNCATED + "OSError: image file is truncated"),
    "truncated.png": (lambda: half(encoded("PNG")), TRUNCATED),
    "no-iend.png": (lambda: encoded("PNG")[:-12], TRUNCATED),
    "bad-crc.png": (png_with_bad_crc, TRUNCATED),
    "signature-only.png": (lambda: b"\x89PNG\r\n\x1a\n", NOT_IMAGE),
    "soi-only.jpg": (lambda: b"\xff\xd8", NOT_IMAGE),
    "truncated.webp": (lambda: half(encoded("WEBP", lossless=True)), TRUNCATED),
    "truncated.bmp": (lambda: half(encoded("BMP")), TRUNCATED),
    "truncated.gif": (lambda: half(encoded("GIF")), TRUNCATED),
    "bomb.png": (bomb_png, BOMB),
}
TOO_SMALL = {
    "1x1.png": (lambda: small((1, 1)), "1x1"),
    "63x200.jpg": (lambda: small((63, 200), "JPEG"), "63x200"),
    "200x10.webp": (lambda: small((200, 10), "WEBP"), "200x10"),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_image_is_skipped_and_listed(tmp_path, caplog, name):
    folder = tmp_path / "10_sks dog"
    folder.mkdir()
    noise_image().save(folder / "good.png")
    content, expected = UNREADABLE[name]
    bad = folder / name
    bad.write_bytes(content())
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder)), seed=0)
    assert ds.num_instance_images == 1 and [e.path.name for e in ds.entries] == ["good.png"]
    assert [p for p, _ in ds.skipped] == [bad]
    reason = ds.skipped[0][1]
    if expected.endswith("(") or expected.startswith(TRUNCATED):
        assert reason.startswith(expected) and reason.endswith(")")
    else:
        assert reason == expected
    assert "\n" not in reason
    assert [r.getMessage() for r in caplog.records] == [f"skipped 1 unreadable image(s):\n  {bad}: {reason}"]


@pytest.mark.parametrize("name", list(TOO_SMALL))
def test_image_too_small_is_skipped_as_too_small_not_unreadable_and_says_what_to_do(tmp_path, caplog, name):
    folder = tmp_path / "10_sks dog"
    folder.mkdir()
    noise_image().save(folder / "good.png")
    content, size = TOO_SMALL[name]
    bad = folder / name
    bad.write_bytes(content())
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder)), seed=0)
    reason = f"too small: {size} px; SD 1.x needs at least 64 px on each side: use a larger image"
    assert ds.skipped == [(bad, reason)]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 image(s) that are too small to train on:\n  {bad}: {reason}"]


def test_image_smaller_than_its_training_size_is_trained_upscaled_with_advice(tmp_path, caplog):
    folder = tmp_path / "10_sks dog"
    folder.mkdir()
    noise_image((64, 64)).save(folder / "small.png")
    noise_image((200, 130)).save(folder / "large.png")
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder), resolution=128), seed=0)
    assert sorted(e.path.name for e in ds.entries) == ["large.png", "small.png"]
    assert [r.getMessage() for r in caplog.records] == [
        "1 image(s) are smaller than the size they train at and are upscaled, which blurs them; use larger images, "
        "a lower dataset.resolution, or dataset.enable_bucket = true with dataset.bucket_no_upscale = true "
        f"(each image trains at its own size):\n  {folder / 'small.png'}: 64x64 px, trains at 128x128"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_offset"):  # the advice works: no upscale, no warning
        ds = build_dataset(cfg(sub(folder), resolution=128, enable_bucket=True, bucket_no_upscale=True,
                               min_bucket_reso=64), seed=0)
    assert {e.path.name: e.bucket for e in ds.entries}["small.png"] == (64, 64)
    assert caplog.records == []


def test_decompression_bomb_warning_range_is_skipped_too(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image((64, 64)).save(folder / "ok.png")
    noise_image((100, 100)).save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 100x100 = 10000: between the limit and twice it
    ds = build_dataset(cfg(sub(folder)), seed=0)
    assert ds.skipped == [(folder / "big.png",
                           "too large: more pixels than Pillow's decompression-bomb limit of 6,000; downscale it")]


def test_many_problems_make_one_warning_listing_each(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "good.png")
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    (folder / "c.png").write_bytes(small((1, 1)))
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        build_dataset(cfg(sub(folder)), seed=0)
    assert [r.getMessage() for r in caplog.records] == [
        "skipped 2 unreadable image(s):\n"
        f"  {folder / 'a.png'}: empty file (0 bytes)\n"
        f"  {folder / 'b.jpg'}: {NOT_IMAGE}",
        "skipped 1 image(s) that are too small to train on:\n"
        f"  {folder / 'c.png'}: too small: 1x1 px; SD 1.x needs at least 64 px on each side: use a larger image"]


def test_non_image_files_are_ignored_with_one_warning(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "good.png")
    (folder / "good.txt").write_text("sks dog", encoding="utf-8")  # caption: no warning
    (folder / "notes.md").write_text("x")
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / ".DS_Store").write_bytes(b"x")  # dot-files: silent
    (folder / "good.npz").write_bytes(b"x")  # kohya's latent cache: silent
    (folder / "more").mkdir()
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder)), seed=0)
    assert ds.num_instance_images == 1 and ds.skipped == []
    assert [r.getMessage() for r in caplog.records] == [
        "ignored 3 file(s) that are neither images (.jpg .jpeg .png .webp .bmp .gif) nor caption files:\n"
        f"  {folder / 'model.safetensors'}\n"
        f"  {folder / 'more'}/ (subfolders are not scanned)\n"
        f"  {folder / 'notes.md'}"]


def test_folder_named_like_an_image_is_ignored_not_opened(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "trap.png").mkdir(parents=True)
    noise_image().save(folder / "good.png")
    ds = build_dataset(cfg(sub(folder)), seed=0)
    assert ds.num_instance_images == 1 and ds.skipped == []


# ---- unusual but valid images: converted correctly ------------------------------------------------

def load_one(tmp_path: Path, write, name: str = "x.png", **cfg_kw) -> tuple[Image.Image, torch.Tensor]:
    """Write one image through `write(path)`, build a dataset, return (load_image result, batch pixels)."""
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    write(folder / name)
    ds = build_dataset(cfg(sub(folder), **cfg_kw), seed=0)
    assert ds.skipped == [] and ds.num_instance_images == 1
    return load_image(folder / name), ds.batch(0).pixel_values[0]


def to_byte(px: torch.Tensor) -> torch.Tensor:
    return ((px + 1) * 127.5).round()


def test_16bit_grey_png_keeps_its_values(tmp_path):
    values = np.full((64, 64), 30000, np.uint16)
    values[:, 32:] = 65535
    img, px = load_one(tmp_path, lambda p: Image.fromarray(values).save(p))
    assert Image.open(tmp_path / "imgs" / "x.png").mode == "I;16"  # the case Pillow's convert() clips to white
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (117, 117, 117)  # 30000 / 257 = 116.7
    assert img.getpixel((60, 5)) == (255, 255, 255)
    assert to_byte(px[:, 5, 5]).tolist() == [117.0] * 3


def test_16bit_gradient_is_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    img, _ = load_one(tmp_path, lambda p: Image.fromarray(ramp).save(p))
    row = np.asarray(img)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 120 <= row[32] <= 135
    assert np.all(np.diff(row) >= 0)


def test_16bit_rgb_png_keeps_its_colour(tmp_path):
    def write(p):  # Pillow cannot write 16-bit RGB: build the PNG by hand
        pixel = struct.pack(">HHH", 0x8000, 0xFFFF, 0x0101)
        rows = b"".join(b"\0" + pixel * 64 for _ in range(64))
        ihdr = struct.pack(">IIBBBBB", 64, 64, 16, 2, 0, 0, 0)
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
                      + png_chunk(b"IEND", b""))

    img, px = load_one(tmp_path, write)
    assert img.getpixel((7, 7)) == (128, 255, 1)
    assert to_byte(px[:, 7, 7]).tolist() == [128.0, 255.0, 1.0]


def test_palette_png_with_transparency_goes_on_white(tmp_path):
    def write(p):
        img = Image.new("P", (64, 64), 0)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.paste(1, (0, 0, 32, 64))
        img.save(p, transparency=0)

    img, _ = load_one(tmp_path, write)
    assert img.getpixel((10, 10)) == (255, 0, 0)
    assert img.getpixel((50, 10)) == (255, 255, 255)  # transparent black -> white, not black


def test_rgba_png_is_composited_on_white(tmp_path):
    def write(p):
        Image.new("RGBA", (64, 64), (0, 0, 0, 128)).save(p)

    img, _ = load_one(tmp_path, write)
    assert all(abs(c - 127) <= 1 for c in img.getpixel((3, 3)))


def test_grey_alpha_png(tmp_path):
    img, _ = load_one(tmp_path, lambda p: Image.new("LA", (64, 64), (0, 0)).save(p))
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg_colour_is_right(tmp_path):
    def write(p):
        Image.new("RGB", (64, 64), (200, 50, 30)).convert("CMYK").save(p, quality=95)

    img, _ = load_one(tmp_path, write, "cmyk.jpg")
    assert Image.open(tmp_path / "imgs" / "cmyk.jpg").mode == "CMYK"
    assert all(abs(a - b) <= 6 for a, b in zip(img.getpixel((32, 32)), (200, 50, 30)))


def _animation(path: Path, **kw):
    frames = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


def test_animated_gif_uses_the_first_frame(tmp_path):
    img, _ = load_one(tmp_path, _animation, "anim.gif")
    assert Image.open(tmp_path / "imgs" / "anim.gif").n_frames == 2
    assert img.getpixel((5, 5)) == (255, 0, 0)


def test_animated_webp_uses_the_first_frame(tmp_path):
    img, _ = load_one(tmp_path, lambda p: _animation(p, lossless=True), "anim.webp")
    assert Image.open(tmp_path / "imgs" / "anim.webp").n_frames == 2
    assert img.getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("name", ["rot.jpg", "rot.png"])
def test_exif_rotated_image_is_upright(tmp_path, name):
    def write(p):
        stored = Image.new("RGB", (128, 64), (0, 0, 255))
        stored.paste((255, 0, 0), (0, 0, 64, 64))  # stored: red left half
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
        stored.save(p, quality=95, exif=exif) if p.suffix == ".jpg" else stored.save(p, exif=exif)

    folder = tmp_path / "imgs"
    folder.mkdir()
    write(folder / name)
    ds = build_dataset(cfg(sub(folder), resolution=128, enable_bucket=True, min_bucket_reso=64,
                                max_bucket_reso=256), seed=0)
    assert ds.entries[0].size == (64, 128)  # upright: portrait
    img = load_image(folder / name)
    assert img.size == (64, 128)
    assert img.getpixel((32, 10))[0] > 200 and img.getpixel((32, 120))[2] > 200  # red top, blue bottom
    px = ds.batch(0).pixel_values[0]
    assert px.shape[1] > px.shape[2]  # a portrait bucket
    assert px[0, 2, px.shape[2] // 2] > 0.6 and px[2, -3, px.shape[2] // 2] > 0.6


def test_broken_exif_block_loads_without_warnings(tmp_path, recwarn):
    def write(p):
        noise_image().save(p, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01"
                                  b"\x00\x09\x00\x00garbage")

    img, _ = load_one(tmp_path, write, "exif.jpg")
    assert img.size == (64, 64)
    assert not [w for w in recwarn if "EXIF" in str(w.message)]


def test_grey_jpeg_bmp_and_one_bit_png(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (64, 64), 90).save(folder / "grey.jpg")
    Image.new("1", (64, 64), 1).save(folder / "bits.png")
    Image.new("RGB", (64, 64), (9, 8, 7)).save(folder / "plain.bmp")
    ds = build_dataset(cfg(sub(folder)), seed=0)
    assert ds.skipped == [] and ds.num_instance_images == 3
    assert load_image(folder / "grey.jpg").getpixel((1, 1)) == (90, 90, 90)
    assert load_image(folder / "bits.png").getpixel((1, 1)) == (255, 255, 255)
    assert load_image(folder / "plain.bmp").getpixel((1, 1)) == (9, 8, 7)


@pytest.mark.parametrize("name", ["chien été 🐶.png", "my dog 1.JPG", "Ωmega.Png", "日本語 の 犬.webp"])
def test_unicode_space_and_uppercase_names(tmp_path, name):
    folder = tmp_path / "10_sks dog"
    folder.mkdir()
    noise_image().save(folder / name, "WEBP" if name.endswith("webp") else None)
    (folder / (Path(name).stem + ".txt")).write_text("sks dog, ünïcödé caption", encoding="utf-8")
    ds = build_dataset(cfg(sub(folder)), seed=0)
    assert [(e.path.name, e.caption) for e in ds.entries] == [(name, "sks dog, ünïcödé caption")]
    assert ds.batch(0).pixel_values.shape == (1, 3, 64, 64)


# ---- captions ----------------------------------------------------------------------------------------

def test_latin1_caption_file(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "a.png")
    (folder / "a.txt").write_bytes(b"sks dog, na\xefve, \xe9t\xe9")
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder)), seed=0)
    assert ds.entries[0].caption == "sks dog, naïve, été"
    assert str(folder / "a.txt") in caplog.records[0].getMessage() and "Latin-1" in caplog.records[0].getMessage()


def test_empty_caption_file_uses_class_tokens(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "a.png")
    (folder / "a.txt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder, class_tokens="ohwx man")), seed=0)
    assert ds.entries[0].caption == "ohwx man"
    assert [r.getMessage() for r in caplog.records] == [
        f"1 caption file(s) are empty; their images use the subset's class_tokens:\n  {folder / 'a.txt'}"]


def test_images_without_caption_or_class_tokens(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "a.png")
    noise_image().save(folder / "b.png")
    with pytest.raises(UserError) as err:
        build_dataset(cfg(sub(folder, class_tokens=None)), seed=0)
    assert str(err.value) == (f"2 image(s) in '{folder}' have no caption (e.g. 'a.txt' is missing or empty) and "
                              "dataset.subsets[0].class_tokens is not set; add caption files, set class_tokens, "
                              "or name the folder like '10_sks dog'")


# ---- folders and settings: one-line errors -------------------------------------------------------------

def one_line_error(c, seed=0) -> str:
    with pytest.raises(UserError) as err:
        build_dataset(c, seed=seed)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_image_folder(tmp_path):
    missing = tmp_path / "nope" / "10_sks dog"
    assert one_line_error(cfg(sub(missing))) == (
        f"dataset.subsets[0].image_dir = '{missing}' does not exist; create the folder and put the training "
        "images in it, or fix the path")


def test_missing_class_image_folder(tmp_path):
    inst = tmp_path / "inst"
    inst.mkdir()
    noise_image().save(inst / "a.png")
    missing = tmp_path / "reg"
    assert one_line_error(cfg(sub(inst), sub(missing, is_reg=True, class_tokens="dog"))) == (
        f"dataset.subsets[1].image_dir = '{missing}' does not exist; create the folder and put the class "
        "images in it, or fix the path")


def test_image_dir_is_a_file(tmp_path):
    f = tmp_path / "photo.png"
    noise_image().save(f)
    assert one_line_error(cfg(sub(f))) == (
        f"dataset.subsets[0].image_dir = '{f}' is not a folder; image_dir must be a folder of images")


def test_empty_dataset(tmp_path):
    folder = tmp_path / "10_sks dog"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    assert one_line_error(cfg(sub(folder))) == (
        f"no readable instance images in '{folder}'; put .jpg, .jpeg, .png, .webp, .bmp or .gif images there")


def test_dataset_of_only_unreadable_images(tmp_path, caplog):
    folder = tmp_path / "10_sks dog"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_bytes(half(encoded("JPEG")))
    (folder / "c.png").write_bytes(small((40, 40)))
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        message = one_line_error(cfg(sub(folder)))
    assert message == (f"no readable instance images in '{folder}'; put .jpg, .jpeg, .png, .webp, .bmp or .gif "
                       "images there (3 file(s) were skipped: 2 unreadable, 1 too small; listed in the warnings above)")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "skipped 2 unreadable image(s)", "skipped 1 image(s) that are too small to train on"]


def test_only_regularization_subsets(tmp_path):
    folder = tmp_path / "reg"
    folder.mkdir()
    noise_image().save(folder / "a.png")
    assert one_line_error(cfg(sub(folder, is_reg=True))) == (
        "the dataset has no instance images configured: set dataset.train_data_dir or add [[dataset.subsets]] "
        "with image_dir")


def test_empty_regularization_folder(tmp_path):
    inst, reg = tmp_path / "inst", tmp_path / "reg"
    inst.mkdir()
    reg.mkdir()
    noise_image().save(inst / "a.png")
    assert one_line_error(cfg(sub(inst), sub(reg, is_reg=True, class_tokens="dog"))) == (
        f"dataset.subsets[1] (is_reg = true) has no readable class images in '{reg}'; add class images, set "
        "num_class_images to have them generated, or remove the subset")


@pytest.mark.parametrize("settings, message", [
    ({"resolution": 500}, "dataset.resolution = 500 is not a multiple of 64; Stable Diffusion 1.x needs image sizes "
                          "divisible by 64 (the VAE divides by 8, the UNet halves that 3 times): use 512"),
    ({"resolution": 32}, "dataset.resolution = 32 is not a multiple of 64; Stable Diffusion 1.x needs image sizes "
                         "divisible by 64 (the VAE divides by 8, the UNet halves that 3 times): use 64"),
    ({"enable_bucket": True, "bucket_reso_steps": 32}, "dataset.bucket_reso_steps = 32 is not a multiple of 64; "
     "Stable Diffusion 1.x needs image sizes divisible by 64 (the VAE divides by 8, the UNet halves that 3 times): "
     "use 64"),
    ({"enable_bucket": True, "min_bucket_reso": 1024, "max_bucket_reso": 256},
     "dataset.min_bucket_reso = 1024 is larger than dataset.max_bucket_reso = 256; set min_bucket_reso <= "
     "max_bucket_reso"),
    ({"enable_bucket": True, "resolution": 512, "min_bucket_reso": 64, "max_bucket_reso": 256},
     "dataset.resolution = 512 must lie between dataset.min_bucket_reso = 64 and dataset.max_bucket_reso = 256"),
    ({"batch_size": 0}, "dataset.batch_size = 0 must be at least 1"),
    ({"enable_bucket": True, "resolution": 64, "min_bucket_reso": 64, "bucket_reso_steps": 128},
     "dataset.bucket_reso_steps = 128 is larger than dataset.resolution = 64; use bucket_reso_steps = 64"),
])
def test_bad_dataset_settings(tmp_path, settings, message):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "a.png")
    assert one_line_error(cfg(sub(folder), **settings)) == message


def test_bucket_settings_are_ignored_without_enable_bucket(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "a.png")
    ds = build_dataset(cfg(sub(folder), min_bucket_reso=1024, max_bucket_reso=256, bucket_reso_steps=8), seed=0)
    assert ds.num_instance_images == 1


def test_bad_subset_settings(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "a.png")
    assert one_line_error(cfg(sub(folder, num_repeats=0))) == "dataset.subsets[0].num_repeats = 0 must be at least 1"
    assert one_line_error(cfg(sub(folder, keep_tokens=-1))) == "dataset.subsets[0].keep_tokens = -1 must be 0 or more"


def test_image_removed_after_the_scan(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "a.png")
    ds = build_dataset(cfg(sub(folder)), seed=0)
    (folder / "a.png").write_bytes(b"gone")
    with pytest.raises(UserError) as err:
        ds.batch(0)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cannot read image '{folder / 'a.png'}' (UnidentifiedImageError: ")
    assert message.endswith("); it was readable when the dataset was scanned: restore it or remove it and start again")


def test_broken_symlink_is_skipped(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "good.png")
    (folder / "link.png").symlink_to(tmp_path / "deleted.png")
    ds = build_dataset(cfg(sub(folder)), seed=0)
    assert ds.skipped == [(folder / "link.png", "cannot read (No such file or directory)")]


def test_long_lists_of_ignored_files_are_cut_but_skipped_images_are_all_listed(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image().save(folder / "good.png")
    for k in range(60):
        (folder / f"bad{k:02d}.png").write_bytes(b"")
        (folder / f"meta{k:02d}.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        ds = build_dataset(cfg(sub(folder)), seed=0)
    skipped, ignored = [r.getMessage() for r in caplog.records]
    assert len(ds.skipped) == 60 and skipped.count(": empty file (0 bytes)") == 60
    assert ignored.startswith("ignored 60 file(s)") and ignored.count(".json") == 50
    assert ignored.endswith("\n  ... and 10 more")
