"""make-dataset: solid colours, varied-brightness synthetic images, captions, atomic writes, errors."""

import numpy as np
import pytest
from PIL import Image

from lora_offset.cli import main
from lora_offset.errors import UserError
from lora_offset.experiments.make_dataset import (make_solid, make_varied, parse_color, solid_image, varied_array,
                                      varied_image)


@pytest.mark.parametrize("text, rgb", [
    ("black", (0, 0, 0)), ("white", (255, 255, 255)), ("WHITE", (255, 255, 255)), ("grey", (128, 128, 128)),
    ("#1a2B3c", (0x1A, 0x2B, 0x3C)), ("#000000", (0, 0, 0)), ("#ff0080", (255, 0, 128)),
])
def test_parse_color(text, rgb):
    assert parse_color(text) == rgb


@pytest.mark.parametrize("bad", ["blak", "#12345", "#1234567", "123456", "#gg0000", ""])
def test_bad_color_is_a_user_error_naming_it(bad):
    with pytest.raises(UserError) as e:
        parse_color(bad)
    assert repr(bad) in str(e.value)
    assert "#RRGGBB" in str(e.value)


def test_solid_image_pixels():
    im = solid_image("#102030", 16)
    assert im.size == (16, 16) and im.mode == "RGB"
    a = np.asarray(im)
    assert (a == [0x10, 0x20, 0x30]).all()
    assert (np.asarray(solid_image((1, 2, 3), 8)) == [1, 2, 3]).all()


def test_make_solid_writes_pngs_and_captions(tmp_path):
    out = tmp_path / "10_sks black"
    paths = make_solid("black", 3, 32, out, caption="a sks black image")
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt", "0002.png", "0002.txt"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
            assert np.asarray(im).max() == 0
        assert p.with_suffix(".txt").read_text(encoding="utf-8").strip() == "a sks black image"


def test_make_solid_without_caption_writes_no_txt(tmp_path):
    make_solid("white", 2, 8, tmp_path / "w")
    names = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert names == ["0000.png", "0001.png"]  # and no leftover temporary files
    with Image.open(tmp_path / "w" / "0001.png") as im:
        assert np.asarray(im).min() == 255


def test_varied_images_span_dark_to_bright_and_are_not_flat():
    rng = np.random.default_rng(0)
    arrays = [varied_array(rng, 32) for _ in range(200)]
    means = np.array([a.mean() for a in arrays])
    assert all(a.shape == (32, 32, 3) and a.min() >= 0 and a.max() <= 1 for a in arrays)
    assert means.min() < 0.1 and means.max() > 0.9
    assert 0.4 < means.mean() < 0.6
    assert 0.2 < means.std() < 0.35  # close to the uniform distribution's 0.29
    # Structure, not flat fields: most images have visible spatial variation.
    assert np.mean([a.std() > 0.02 for a in arrays]) > 0.8


def test_varied_image_is_deterministic_per_rng_seed():
    a = np.asarray(varied_image(np.random.default_rng(5), 24))
    b = np.asarray(varied_image(np.random.default_rng(5), 24))
    c = np.asarray(varied_image(np.random.default_rng(6), 24))
    assert a.dtype == np.uint8 and a.shape == (24, 24, 3)
    assert (a == b).all() and not (a == c).all()


def test_make_varied_seeded(tmp_path):
    p1 = make_varied(4, 16, tmp_path / "a", seed=3)
    p2 = make_varied(4, 16, tmp_path / "b", seed=3)
    for x, y in zip(p1, p2):
        assert x.read_bytes() == y.read_bytes()
    assert p1[0].read_bytes() != p1[1].read_bytes()


@pytest.mark.parametrize("n, size, word", [(0, 16, "--n"), (2, 4, "--size")])
def test_bad_counts(tmp_path, n, size, word):
    with pytest.raises(UserError, match=word):
        make_solid("black", n, size, tmp_path / "x")


def test_out_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        make_varied(1, 8, f)


def test_cli_solid_and_varied(tmp_path, capsys):
    assert main(["make-dataset", "solid", "--color", "#ffffff", "--n", "2", "--size", "16",
                 str(tmp_path / "s"), "--caption", "white"]) == 0
    assert (tmp_path / "s" / "0001.txt").read_text(encoding="utf-8") == "white\n"
    assert main(["make-dataset", "varied", "--n", "3", "--size", "16", "--seed", "1", str(tmp_path / "v")]) == 0
    assert len(list((tmp_path / "v").glob("*.png"))) == 3
    assert "wrote 3 images" in capsys.readouterr().out


def test_cli_bad_color_exits_2_with_message(tmp_path, capsys):
    assert main(["make-dataset", "solid", "--color", "purpleish", "--n", "1", "--size", "8", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --color 'purpleish'")
    assert not (tmp_path / "x").exists()
