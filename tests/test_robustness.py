"""Nothing lost, nothing crashes: kill -9 and resume, Ctrl-C, a kill during a save, NaN guards,
and two-process training. Training runs in real subprocesses that receive real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_offset.cli import main
from tests.test_train import make_images, write_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "5_sks dog", 4)


def start_training(config: Path, *extra: str, driver: str | None = None) -> subprocess.Popen:
    """`python -m lora_offset train` in a subprocess (optionally through a driver script that patches first).

    Its output goes to `proc.log` (a file, so a full pipe can never stall the child)."""
    argv = [sys.executable, "-m", "lora_offset", "train", "--config", str(config), *extra]
    if driver is not None:
        argv = [sys.executable, "-c", driver, "train", "--config", str(config), *extra]
    log = config.parent / "train.log"
    proc = subprocess.Popen(argv, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output_of(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}):\n{output_of(proc)}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the training subprocess")


def states(out: Path) -> list[Path]:
    return sorted((out / "state").glob("state-*.pt"))


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, images):
    """An uninterrupted 6-step run: the adapter every interrupted run must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root, tiny_model_dir, images, training={"max_steps": 6, "output_dir": str(root / "out")})
    assert main(["train", "--config", str(config)]) == 0
    return root / "out" / "tiny.safetensors"


def test_sigkill_during_training_then_resume_latest_matches_uninterrupted(tmp_path, tiny_model_dir, images, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, images,
                          training={"max_steps": 6, "output_dir": str(out), "save_state_every_steps": 1})
    proc = start_training(config)
    wait_for(lambda: any(int(p.stem.split("-")[1]) >= 2 for p in states(out)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "tiny.safetensors").exists()
    for state in states(out):  # whatever was on disk at the kill is complete
        torch.load(state, weights_only=True)
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    assert_same_adapter(out / "tiny.safetensors", reference)


SLOW_SAVE_DRIVER = textwrap.dedent("""
    import sys, time
    import lora_offset.fileio as fileio
    real = fileio.atomic_path.__wrapped__
    import contextlib

    @contextlib.contextmanager
    def slow_atomic_path(path):
        gen = real(path)
        tmp = next(gen)
        try:
            yield tmp
        except BaseException as e:
            gen.throw(e)
            raise
        print("SAVING", path, flush=True)
        time.sleep(2.0)  # the file is written, not yet renamed: a kill here must not tear anything
        try:
            next(gen)
        except StopIteration:
            pass

    fileio.atomic_path = slow_atomic_path
    import lora_offset.training.state as state
    state.atomic_path = slow_atomic_path
    from lora_offset.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_a_save_leaves_no_torn_file(tmp_path, tiny_model_dir, images, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, images,
                          training={"max_steps": 6, "output_dir": str(out), "save_state_every_steps": 1})
    proc = start_training(config, driver=SLOW_SAVE_DRIVER)
    wait_for(lambda: "state-00000002.pt" in output_of(proc), proc)
    time.sleep(0.3)  # inside the 2 s between writing the temporary file and renaming it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The state being written is not there under its final name; the previous one is complete.
    names = [p.name for p in states(out)]
    assert names == ["state-00000001.pt"]
    assert torch.load(out / "state" / "state-00000001.pt", weights_only=True)["step"] == 1
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    assert_same_adapter(out / "tiny.safetensors", reference)


def test_ctrl_c_saves_state_and_adapter_exits_130_and_resume_matches(tmp_path, tiny_model_dir, images, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, images,
                          training={"max_steps": 6, "output_dir": str(out), "save_state_every_steps": 2})
    proc = start_training(config)
    wait_for(lambda: bool(states(out)), proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=240)
    output = output_of(proc)
    assert proc.returncode == 130, output
    assert "lora-offset train --config <your config> --resume latest" in output
    assert (out / "tiny.safetensors").exists()  # the adapter as of the interrupted step
    step = torch.load(states(out)[-1], weights_only=True)["step"]
    assert 2 <= step < 6
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    assert_same_adapter(out / "tiny.safetensors", reference)


def test_a_nan_step_is_skipped_and_never_reaches_the_file(tmp_path, tiny_model_dir, images, monkeypatch, caplog):
    from lora_offset.training import losses

    real = losses.per_sample_loss
    calls = {"n": 0}

    def nan_on_second_call(pred, target, *args):
        calls["n"] += 1
        loss = real(pred, target, *args)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(losses, "per_sample_loss", nan_on_second_call)
    config = write_config(tmp_path, tiny_model_dir, images, training={"max_steps": 4})
    assert main(["train", "--config", str(config)]) == 0
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row)" in caplog.text
    tensors = load_file(tmp_path / "out" / "tiny.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_non_finite_steps_in_a_row_stop_with_advice(tmp_path, tiny_model_dir, images, monkeypatch, capsys):
    from lora_offset.training import losses

    monkeypatch.setattr(losses, "per_sample_loss", lambda pred, target, *args: (pred - target).float().mean((1, 2, 3)) * float("inf"))
    config = write_config(tmp_path, tiny_model_dir, images, training={"max_steps": 20, "max_nonfinite_steps": 3})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "error: stopped: 3 steps in a row had a non-finite loss or gradient" in err
    assert 'try "bf16" or "no"' in err
    assert not (tmp_path / "out" / "tiny.safetensors").exists()


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, images):
    """accelerate launch --multi_gpu --num_processes 2 on a CPU machine (torchrun + gloo): each process
    takes half of the global batch, so the run equals one process with twice the batch, up to float
    reduction order. AdamW's first steps move every element by about ±lr whatever its gradient's size,
    so an element whose gradient is ~0 can flip sign between the two runs: we allow that for a tiny
    fraction of elements and require everything else to agree."""
    # One step: it compares the global gradient; later steps would compound the allowed sign flips.
    one = write_config(tmp_path / "one", tiny_model_dir, images, training={
        "max_steps": 1, "output_dir": str(tmp_path / "one" / "out"), "optimizer": "adamw"},
        dataset={"batch_size": 2})
    two = write_config(tmp_path / "two", tiny_model_dir, images, training={
        "max_steps": 1, "output_dir": str(tmp_path / "two" / "out"), "optimizer": "adamw"},
        dataset={"batch_size": 1})
    assert main(["train", "--config", str(one)]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_offset", "train", "--config", str(two)],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a = load_file(tmp_path / "one" / "out" / "tiny.safetensors")
    b = load_file(tmp_path / "two" / "out" / "tiny.safetensors")
    assert a.keys() == b.keys()
    total = sum(t.numel() for t in a.values())
    differing = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    assert differing / total < 0.005, f"{differing} of {total} elements differ"
    # Every module trained, except the mid block's self-attention q/k: at 8x8 latents it sees one token.
    trained = [k for k in a if k.endswith("lora_up.weight") and a[k].abs().sum() > 0]
    assert len(trained) == 190
    log = result.stdout + result.stderr
    assert log.count("saved ") == 2  # print + log line of the main process only
    # Only the main process wrote files: one adapter, one log folder.
    assert sorted(p.name for p in (tmp_path / "two" / "out").glob("*.safetensors")) == ["tiny.safetensors"]
