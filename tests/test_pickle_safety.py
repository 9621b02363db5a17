"""Pickled checkpoints run code when unpickled: refused by default, and with --allow-pickle read
with torch.load(weights_only=True), so a malicious file's payload never runs either way."""

import os
import pickle

import pytest
import torch

from lora_offset.cli import main
from lora_offset.errors import UserError
from lora_offset.formats import checkpoint
from lora_offset.tools import merge


class WritesMarker:
    """Unpickling this calls os.system: what a malicious .ckpt does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > '{self.marker}'",))


@pytest.fixture()
def malicious_ckpt(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.ones(4, 4)}, "payload": WritesMarker(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_refused_without_opt_in(malicious_ckpt):
    path, marker = malicious_ckpt
    with pytest.raises(UserError) as e:
        checkpoint.read_state_dict(path)
    message = str(e.value)
    assert str(path) in message and "--allow-pickle" in message and "model.allow_pickle = true" in message
    assert not marker.exists()


def test_opt_in_uses_weights_only_and_never_runs_the_payload(malicious_ckpt):
    path, marker = malicious_ckpt
    with pytest.raises(UserError, match=r"evil\.ckpt: could not be loaded with torch\.load\(weights_only=True\)"):
        checkpoint.read_state_dict(path, allow_pickle=True)
    with pytest.raises(UserError, match="evil.ckpt"):
        checkpoint.load_single_file(path, allow_pickle=True)
    assert not marker.exists()
    # The file really is malicious: an unsafe load runs the payload (so the checks above can fail).
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.read_text().strip() == "pwned"


def test_merge_cli_refuses_pickled_base_and_lora(malicious_ckpt, tmp_path, capsys):
    path, marker = malicious_ckpt
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--base", str(path), "--lora", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "evil.ckpt" in err and "--allow-pickle" in err
    assert main(["merge", "--base", str(path), "--lora", str(path), "--out", str(out), "--allow-pickle"]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    with pytest.raises(UserError):
        merge.merge_checkpoint(path, [(path, 1.0)], out, allow_pickle=True)
    assert not marker.exists() and not out.exists()


def test_plain_pickle_protocol_file_is_refused_too(tmp_path):
    """Not only torch.save zip files: a raw pickle stream with a .pt suffix goes the same way."""
    marker = tmp_path / "marker.txt"
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"w": WritesMarker(marker)}))
    with pytest.raises(UserError, match="raw.pt: is a pickled .pt file"):
        checkpoint.read_state_dict(path)
    with pytest.raises(UserError, match="raw.pt"):
        checkpoint.read_state_dict(path, allow_pickle=True)
    assert not marker.exists()


def test_safe_pickled_checkpoint_loads_with_opt_in(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, path)
    assert torch.equal(checkpoint.read_state_dict(path, allow_pickle=True)["w"], torch.arange(3.0))
