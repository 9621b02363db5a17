"""Nothing lost, nothing crashes: kill -9 anywhere and resume, Ctrl-C, a full disk, NaN guards,
bit-identical runs in a user's default settings, and two-process training. Killed runs are real
subprocesses (tests/train_driver.py pauses one exactly where a kill should land); Ctrl-C is a real
SIGINT to an in-process run; a full disk is a real small tmpfs where the machine allows a mount."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_offset.cli import main
from tests.test_train import make_images, write_config
from tests.test_train_kohya_datasets import scalars

ROOT = Path(__file__).resolve().parents[1]
# Tests pin one CPU thread for speed (tiny models on 2 shared cores); USER_ENV is what a user's shell
# has: no thread pin, so torch uses its default count (the machine's cores). Its OMP_WAIT_POLICY only
# makes idle OpenMP threads sleep instead of spinning (the same bits: measured), which keeps 2-thread
# runs from running 3-6x slower while other processes load the machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
# MKL_CBWR is left out too: `import lora_offset` in this test process set it, and a user's shell has
# none (the package must set it in the child itself).
USER_ENV = {**{k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR")},
            "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "5_sks dog", 4)


def start_training(config: Path, *extra: str, driver: bool = False, env: dict | None = None,
                   base_env: dict = ENV) -> subprocess.Popen:
    """`python -m lora_offset train` in a subprocess (or through tests/train_driver.py, which can pause it).

    Its output goes to `proc.log` (a file, so a full pipe can never stall the child)."""
    module = "tests.train_driver" if driver else "lora_offset"
    argv = [sys.executable, "-m", module, "train", "--config", str(config), *extra]
    log = config.parent / f"train-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(argv, env={**base_env, **(env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    proc.log = log
    return proc


def output_of(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    """Poll until `predicate()` holds. The generous timeout only bounds a hung run: nothing here races a clock."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}):\n{output_of(proc)}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for the training subprocess:\n{output_of(proc)}")


def finish(proc: subprocess.Popen, timeout: float = 600.0) -> str:
    """Wait for the run to end; return its output."""
    proc.wait(timeout=timeout)
    return output_of(proc)


def kill_when_paused(proc: subprocess.Popen, where: str) -> None:
    wait_for(lambda: f"PAUSED {where}" in output_of(proc), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def states(out: Path) -> list[Path]:
    return sorted((out / "state").glob("state-*.pt"))


def temporaries(out: Path) -> list[str]:
    """The files that atomic writes in progress (or killed) have under `out`: `.NAME.XXXXXXXX.tmp` -> NAME."""
    return sorted(p.name[1:].rsplit(".", 2)[0] for p in out.rglob(".*.tmp"))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, images):
    """An uninterrupted 6-step run (adapters at steps 2, 4 and 6): what every interrupted run of the same
    config must reproduce bit for bit. In-process, so on the one thread the tests pin, as ENV does."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root, tiny_model_dir, images,
                          training={"max_steps": 6, "output_dir": str(root / "out"), "save_every_steps": 2})
    assert main(["train", "--config", str(config)]) == 0
    return root / "out" / "tiny.safetensors"


@pytest.mark.slow
def test_sigkill_at_five_points_and_resume_latest_each_time_ends_bit_identical(tmp_path, tiny_model_dir, images,
                                                                               reference):
    """SIGKILL inside a state save, while a resume reads its state, inside a training step, inside an
    intermediate adapter save and inside the final adapter save (steps drawn at random: the seed is in
    the message), `--resume latest` after each. The run ends with the reference's adapters, bit for
    bit, and no temporary file outlives the start of a resume. Every other process starts with two CPU
    threads, as from another shell: a resume keeps the thread count the run started with."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    k = rng.choice([2, 3])  # killed in the save of state k: the next run resumes from state k-1
    n = rng.randint(k, 4)  # killed in step n: resumes from n-1, before the step-4 adapter is written
    points = [f"save:state-{k:08d}.pt", "resume", f"step:{n}", "save:tiny-step000004.safetensors",
              "save:tiny.safetensors"]
    context = f"random seed {seed}, kill points {points}"
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "max_steps": 6, "output_dir": str(out), "save_state_every_steps": 1, "save_every_steps": 2})
    for i, point in enumerate(points):
        proc = start_training(config, *(["--resume", "latest"] if i else []), driver=True,
                              env={"PAUSE_AT": point, **({"OMP_NUM_THREADS": "2"} if i % 2 else {})})
        wait_for(lambda: f"PAUSED {point}" in output_of(proc), proc)
        # The save in progress is the only one with a temporary file: the earlier kills' are gone.
        in_progress = [point.partition(":")[2]] if point.startswith("save:") else []
        assert temporaries(out) == in_progress, context
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for state in states(out):  # whatever is on disk under its final name is complete
            torch.load(state, weights_only=True)
    output = finish(start_training(config, "--resume", "latest", env={"OMP_NUM_THREADS": "2"}))
    assert "saved " in output, context + output
    assert "resuming with 1 CPU threads, as the run that saved the state (this process would use 2)" in output
    assert temporaries(out) == [], context
    for name in ("tiny-step000002.safetensors", "tiny-step000004.safetensors", "tiny.safetensors"):
        assert_same_adapter(out / name, reference.parent / name)


def ctrl_c_in_step(monkeypatch, step: int, presses: int) -> None:
    """Press Ctrl-C `presses` times (a real SIGINT to this process) right after optimizer step `step` (1-based)."""
    from lora_offset.training import train as train_module

    real = train_module.optimizer_step

    def step_then_ctrl_c(parts, index):
        loss = real(parts, index)
        if index + 1 == step:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train_module, "optimizer_step", step_then_ctrl_c)


def test_ctrl_c_saves_state_and_adapter_exits_130_and_resume_matches(tmp_path, tiny_model_dir, images, reference,
                                                                     monkeypatch, caplog):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, images,
                          training={"max_steps": 6, "output_dir": str(out), "save_state_every_steps": 2})
    # What SIGINT did before the run: Python's default, or "ignore" when pytest itself was started in
    # the background by a non-interactive shell (which then ignores SIGINT)
    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        ctrl_c_in_step(m, 3, presses=1)
        assert main(["train", "--config", str(config)]) == 130
    assert "Ctrl-C: finishing this step, then saving (press again to abort without saving)" in caplog.text
    assert "lora-offset train --config <your config> --resume latest" in caplog.text
    assert (out / "tiny.safetensors").exists()  # the adapter as of the interrupted step
    assert [p.name for p in states(out)] == ["state-00000002.pt", "state-00000003.pt"]
    assert torch.load(states(out)[-1], weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the run gave Ctrl-C back
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    assert_same_adapter(out / "tiny.safetensors", reference)


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path, tiny_model_dir, images, monkeypatch, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_dir, images,
                          training={"max_steps": 6, "output_dir": str(out), "save_state_every_steps": 2})
    ctrl_c_in_step(monkeypatch, 3, presses=2)
    assert main(["train", "--config", str(config)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"
    assert [p.name for p in states(out)] == ["state-00000002.pt"]  # nothing saved after the first Ctrl-C
    assert not (out / "tiny.safetensors").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs where this machine lets us mount one (root with CAP_SYS_ADMIN), else None: the
    failing save then meets an injected ENOSPC instead (tests/train_driver.py)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    try:
        yield disk if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_keeps_the_last_adapter_and_state_says_so_and_resume_continues(tmp_path, tiny_model_dir, images,
                                                                                 reference, small_disk, monkeypatch,
                                                                                 capsys):
    from tests.train_driver import install_disk_full

    out = (small_disk or tmp_path) / "out"
    filler = small_disk / "filler" if small_disk else None
    config = write_config(tmp_path, tiny_model_dir, images, training={
        "max_steps": 6, "output_dir": str(out), "save_state_every_steps": 2, "save_every_steps": 2})
    out.mkdir()
    earlier = reference.with_name("tiny-step000002.safetensors").read_bytes()
    (out / "tiny.safetensors").write_bytes(earlier)  # an earlier run's adapter: a failed save must keep it

    def train_until_the_disk_fills_at(name: str, *extra: str) -> str:
        with monkeypatch.context() as m:
            install_disk_full(f"save:{name}", str(filler) if filler else None, patch=m.setattr)
            assert main(["train", "--config", str(config), *extra]) == 2
        if filler:
            filler.unlink()  # space again
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return error_lines(err)

    # The disk fills up as the state of step 4 is saved.
    lines = train_until_the_disk_fills_at("state-00000004.pt")
    assert lines == [
        f"error: no space left in '{out / 'state'}' to write state-00000004.pt: it needs about "
        f"{_size_in(lines[0])} MiB, {_free_in(lines[0])} MiB free; free some space; then continue from "
        f"state-00000002.pt with: lora-offset train --config {config} --resume latest"]
    assert float(_size_in(lines[0])) > 0
    assert [p.name for p in states(out)] == ["state-00000002.pt"]
    assert torch.load(states(out)[0], weights_only=True)["step"] == 2
    for step in (2, 4):  # the adapters written before the failed save are there, complete
        assert_same_adapter(out / f"tiny-step{step:06d}.safetensors",
                            reference.with_name(f"tiny-step{step:06d}.safetensors"))
    assert (out / "tiny.safetensors").read_bytes() == earlier
    assert temporaries(out) == []

    # Resumed, it fills up again as the final adapter is saved: the earlier adapter stays as it was.
    lines = train_until_the_disk_fills_at("tiny.safetensors", "--resume", "latest")
    assert lines == [
        f"error: no space left in '{out}' to write tiny.safetensors: it needs about {_size_in(lines[0])} MiB, "
        f"{_free_in(lines[0])} MiB free; free some space; then continue from state-00000004.pt with: "
        f"lora-offset train --config {config} --resume latest"]
    assert (out / "tiny.safetensors").read_bytes() == earlier
    assert [p.name for p in states(out)] == ["state-00000002.pt", "state-00000004.pt"]

    # With space again, --resume latest continues from the last good state to the uninterrupted result.
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    assert_same_adapter(out / "tiny.safetensors", reference)
    assert temporaries(out) == []


def _size_in(line: str) -> str:
    return line.split("it needs about ", 1)[1].split(" MiB", 1)[0]


def _free_in(line: str) -> str:
    return line.split(" MiB, ", 1)[1].split(" MiB free", 1)[0]


@pytest.mark.slow
def test_default_settings_two_runs_and_a_killed_resumed_run_give_identical_adapters(tmp_path, tiny_model_dir, images):
    """docs/troubleshooting.md's promise in the environment a user has: no thread pin, so torch's default thread count
    (2 on a 2-core machine), and the default training.deterministic. Run b is a second run of run a's
    config, killed inside its save of state 2 and resumed from state 1."""
    default_threads = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                         env=USER_ENV, capture_output=True, text=True, check=True).stdout)
    # Light steps (two threads on a loaded 2-core machine pay for every parallel op), defaults otherwise.
    configs = {name: write_config(tmp_path / name, tiny_model_dir, images, training={
        "max_steps": 3, "output_dir": str(tmp_path / name / "out"), "save_state_every_steps": 1,
        "save_every_steps": 1, "gradient_checkpointing": False}, dataset={"batch_size": 1}) for name in ("a", "b")}
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    output = finish(start_training(configs["a"], base_env=USER_ENV))
    assert "saved " in output, output
    kill_when_paused(start_training(configs["b"], driver=True, base_env=USER_ENV,
                                    env={"PAUSE_AT": "save:state-00000002.pt"}), "save:state-00000002.pt")
    assert [p.name for p in states(b)] == ["state-00000001.pt"]
    assert torch.load(states(b)[0], weights_only=True)["num_threads"] == default_threads
    output = finish(start_training(configs["b"], "--resume", "latest", base_env=USER_ENV))
    assert f"resumed from {b / 'state' / 'state-00000001.pt'} at step 1" in output, output
    assert_same_adapter(a / "tiny-step000001.safetensors", b / "tiny-step000001.safetensors")  # two runs
    assert_same_adapter(a / "tiny-step000002.safetensors", b / "tiny-step000002.safetensors")  # kill + resume
    assert_same_adapter(a / "tiny.safetensors", b / "tiny.safetensors")


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
    reduction order. AdamW's first step moves every element by about ±lr whatever its gradient's size,
    so an element whose gradient is within float noise of 0 can move either way in either run.

    The mid block's self-attention q and k see one token at 8x8 latents: their gradient is 0 in exact
    arithmetic, and only float noise (which differs between the runs) moves them, so nothing is
    asserted of them but the ±lr bound. Everywhere else, elements whose gradient is near 0 by chance
    are rare (about 0.1% differ); fewer than 1% may. Wrong slicing (both processes on the same
    half, say) would change the sign of a large share of all gradients. The validation loss logged by
    the two processes is the one process's (measured: 4e-7 apart; without the reduction across
    processes it was 3 % off)."""
    # One step: it compares the global gradient; later steps would compound the sign flips. Two of the
    # four images are held out, so the validation loss after that step (TensorBoard) is compared too.
    lr = 1e-3
    one, two = (write_config(tmp_path / name, tiny_model_dir, images, training={
        "max_steps": 1, "output_dir": str(tmp_path / name / "out"), "optimizer": "adamw", "learning_rate": lr,
        "validate_every_n_steps": 1, "log_with": "tensorboard"},
        dataset={"batch_size": batch_size, "validation_split": 0.5}) for name, batch_size in (("one", 2), ("two", 1)))
    assert main(["train", "--config", str(one)]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_offset", "train", "--config", str(two)],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a = load_file(tmp_path / "one" / "out" / "tiny.safetensors")
    b = load_file(tmp_path / "two" / "out" / "tiny.safetensors")
    assert a.keys() == b.keys()
    one_token = {f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_{x}" for x in ("q", "k")}
    signal_keys = [k for k in a if k.split(".")[0] not in one_token]
    total = sum(a[k].numel() for k in signal_keys)
    differing = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in signal_keys)
    assert differing / total < 0.01, f"{differing} of {total} elements differ"  # measured: ~0.1%
    for key in a:  # one AdamW step from the same start: no element can be more than 2 lr apart
        assert (a[key] - b[key]).abs().max() <= 2 * lr * 1.01, key
    # Every module with a real gradient trained (lora_up starts at 0, so a trained one is non-zero).
    ups = {k.split(".")[0] for k in a if k.endswith("lora_up.weight")}
    assert len(ups) == 192
    for adapter in (a, b):
        trained = {k.split(".")[0] for k in a if k.endswith("lora_up.weight") and adapter[k].abs().sum() > 0}
        assert trained >= ups - one_token
    # The validation loss is the mean over the whole held-out batch: each process scores its own half
    # with the global batch's noise, and the halves are averaged. Scoring one half twice would be off
    # by the difference between the two images' losses (percents); the runs' adapters differ by float noise.
    val_one = scalars(tmp_path / "one" / "out" / "logs", "loss/validation")
    val_two = scalars(tmp_path / "two" / "out" / "logs", "loss/validation")
    assert set(val_one) == set(val_two) == {1}
    assert val_two[1] == pytest.approx(val_one[1], rel=1e-4)
    log = result.stdout + result.stderr
    assert log.count("saved ") == 2  # print + log line of the main process only
    # Only the main process wrote files: one adapter, one log folder.
    assert sorted(p.name for p in (tmp_path / "two" / "out").glob("*.safetensors")) == ["tiny.safetensors"]
