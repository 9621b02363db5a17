"""Every number and every output path of every command, driven from the commands' own argument
definitions: the walk below finds each `Number`, `FileAndNumber` and `OutputPath` (lora_offset.arguments)
in the parsers that lora_offset.cli builds, so a new flag is tested without a new test, and a number
or an output declared without its range or kind fails here. Each bad value must end in exit code 2,
exactly one `error:` line naming the flag and the value or path, no traceback, and nothing written.

A read-only folder is made read-only for real: the command runs in a subprocess that file permissions
bind (as root: started by setpriv without CAP_DAC_OVERRIDE, which is what lets root write a chmod-555
folder), and the subprocess first proves it cannot write there. OS errors past the parser (unreadable
inputs, a folder where a file goes, a full disk) reach the one boundary in lora_offset.cli.main.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_offset.arguments import FileAndNumber, Number, OutputPath, split_file_and_number
from lora_offset.cli import build_parser, main
from lora_offset.errors import UserError
from lora_offset.fileio import atomic_write_bytes, describe_os_error, output_problem
from tests.cli_driver import stop_commands

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------------- the walk

def leaf_parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser) of every command and sub-command (`make-dataset solid`)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers and words:
        yield words, parser
    for action in subparsers:
        for name, child in action.choices.items():
            yield from leaf_parsers(child, (*words, name))


LEAVES = list(leaf_parsers(build_parser()))


def name_of(action: argparse.Action) -> str:
    """How argparse names the argument in its error line: `argument NAME: ...`."""
    return argparse._get_action_name(action)


def number_of(action: argparse.Action) -> Number | None:
    kind = action.type
    return kind if isinstance(kind, Number) else kind.number if isinstance(kind, FileAndNumber) else None


def is_value_argument(action: argparse.Action) -> bool:
    return not isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)) \
        and action.nargs != 0


NUMBERS = [(words, parser, a) for words, parser in LEAVES for a in parser._actions if number_of(a) is not None]
OUTPUTS = [(words, parser, a, kind) for words, parser in LEAVES for a in parser._actions
           if isinstance(a.type, OutputPath)
           for kind in (("file", "folder") if a.type.kind == "auto" else (a.type.kind,))]


def show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def inside(number: Number) -> str:
    return show(number.low if not number.low_open else (number.low + number.high) / 2)


def outside(number: Number) -> list[str]:
    """nan, inf, -inf, a negative number outside the range, an absurdly large one, and just outside each end."""
    negative = "-1" if number.low >= 0 else show(number.low - 1)  # a ratio may be negative: below its range
    huge = "1e30" if number.kind is float else "1" + "0" * 30
    below = show(number.low) if number.low_open else show(number.low - 1)
    return list(dict.fromkeys(["nan", "inf", "-inf", negative, huge, show(number.high + 1), below]))


def filler(action: argparse.Action, folder: Path) -> str:
    """A value that passes the argument's own check: what a required argument gets while another is tested."""
    kind = action.type
    if isinstance(kind, Number):
        return inside(kind)
    if action.choices:
        return str(next(iter(action.choices)))
    if isinstance(kind, OutputPath):
        return str(folder / ("out.safetensors" if kind.kind != "folder" else "out"))
    return str(folder / "in.safetensors")  # an input file, or text: never read, parsing stops first


def command_line(words, parser, folder: Path, tested: argparse.Action, value: str) -> list[str]:
    """The command words, every required argument (a filler), and `tested` given `value`."""
    options, positionals = [], []
    for action in parser._actions:
        if not is_value_argument(action):
            continue
        given = value if action is tested else filler(action, folder) if action.required else None
        if given is None:
            continue
        if action.option_strings:
            options.append(f"{action.option_strings[0]}={given}")  # '=': a value may start with '-'
        else:
            positionals.append(given)
    return [*words, *options, *positionals]


def tree(folder: Path) -> list[str]:
    """Everything under `folder`, temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def assert_one_error(rc, err: str, *named: str) -> str:
    lines = error_lines(err)
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, (rc, err)
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_every_number_and_every_output_is_declared_and_the_walk_finds_them():
    """A flag with a plain int/float type, or an output without OutputPath, would escape the tests below."""
    plain = [f"{' '.join(w)} {name_of(a)}" for w, p in LEAVES for a in p._actions if a.type in (int, float)]
    assert not plain, f"declare these numbers' ranges with lora_offset.arguments.Number: {plain}"
    undeclared = [f"{' '.join(w)} {name_of(a)}" for w, p in LEAVES for a in p._actions
                  if (a.dest in ("out", "output") or a.metavar == "OUT") and not isinstance(a.type, OutputPath)]
    assert not undeclared, f"declare these outputs with lora_offset.arguments.OutputPath: {undeclared}"
    numbers = {(" ".join(w), name_of(a)) for w, _, a in NUMBERS}
    assert {("merge", "--lora"), ("merge", "--rank"), ("eval", "--lora"), ("eval", "--guidance"),
            ("eval", "--leak-fraction"), ("resize", "--param"), ("extract", "--min-diff"),
            ("make-dataset varied", "--seed"), ("make-dataset solid", "--size"), ("demo", "--jobs")} <= numbers
    outputs = {(" ".join(w), name_of(a)) for w, _, a, _ in OUTPUTS}
    assert {("convert", "OUT"), ("resize", "OUT"), ("extract", "OUT"), ("merge", "--out"), ("eval", "--out"),
            ("make-dataset solid", "OUT"), ("make-dataset varied", "OUT"), ("demo", "--out")} <= outputs


# ---------------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("words, parser, action", NUMBERS,
                         ids=[f"{' '.join(w)} {name_of(a)}" for w, _, a in NUMBERS])
def test_every_number_refuses_nan_inf_negative_and_huge_values(words, parser, action, tmp_path, monkeypatch, capsys):
    number = number_of(action)
    # The range is a range: its ends and a value inside are taken.
    for value in (inside(number), show(number.high), *([] if number.low_open else [show(number.low)])):
        assert number(value) == number.kind(value)
    stop_commands(monkeypatch.setattr)  # a value let through fails at once, not after running the command
    monkeypatch.chdir(tmp_path)  # a default output (eval's ./eval) would be looked at here
    for value in outside(number):
        text = f"{tmp_path / 'in.safetensors'}:{value}" if isinstance(action.type, FileAndNumber) else value
        rc = main(command_line(words, parser, tmp_path, action, text))
        line = assert_one_error(rc, capsys.readouterr().err, f"argument {name_of(action)}: ", text)
        assert "give a" in line  # ... and what to give: the range
    assert tree(tmp_path) == []  # nothing written, not even a temporary file


def test_number_messages_name_the_value_and_the_range():
    rank = Number(int, 1, 1280, why="no SD 1.x weight has more rows")
    for text, message in [
        ("0", "0 is out of range; give a whole number from 1 to 1280 (no SD 1.x weight has more rows)"),
        ("2.5", "'2.5' is not a whole number; give a whole number from 1 to 1280 (no SD 1.x weight has more rows)"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=None) as info:
            rank(text)
        assert str(info.value) == message
    with pytest.raises(argparse.ArgumentTypeError) as info:
        Number(float, 0, 1, low_open=True)("nan")
    assert str(info.value) == "nan is not a finite number; give a number above 0 and at most 1"
    ratio = FileAndNumber(Number(float, -100, 100))
    assert ratio("a.safetensors:-0.5") == (Path("a.safetensors"), -0.5)
    assert ratio("a.safetensors") == (Path("a.safetensors"), 1.0)
    with pytest.raises(argparse.ArgumentTypeError) as info:
        ratio("a.safetensors:inf")
    assert str(info.value) == "a.safetensors:inf: the ratio inf is not a finite number; give a number from -100 to 100"


@pytest.mark.parametrize("text, split", [
    ("a.safetensors:0.7", ("a.safetensors", "0.7")), ("a.safetensors", ("a.safetensors", None)),
    ("a:b.safetensors:-1", ("a:b.safetensors", "-1")), (r"C:\loras\a.safetensors", (r"C:\loras\a.safetensors", None)),
    ("a.safetensors:nan", ("a.safetensors", "nan")), ("a.safetensors:", ("a.safetensors:", None)), (":1", (":1", None)),
])
def test_split_file_and_number(text, split):
    assert split_file_and_number(text) == split


def test_merge_and_eval_refuse_non_finite_ratios_from_python_too(tmp_path):
    from lora_offset.experiments.evaluate import evaluate
    from lora_offset.tools.merge import merge_checkpoint
    from lora_offset.tools.merge_loras import merge_lora_files

    lora = tmp_path / "a.safetensors"
    with pytest.raises(UserError, match="the ratio nan is not a finite number"):
        merge_lora_files([(lora, float("nan"))], tmp_path / "m.safetensors")
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"")
    with pytest.raises(UserError, match="the ratio inf is not a finite number"):
        merge_checkpoint(base, [(lora, float("inf"))], tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="the LoRA weight nan is not a finite number"):
        evaluate("base", [(lora, float("nan"))], out=tmp_path / "eval")
    assert tree(tmp_path) == ["base.safetensors"]


# ---------------------------------------------------------------------------------- outputs

@pytest.fixture
def places(tmp_path):
    """tmp_path/afile (a file), tmp_path/taken.safetensors/ (a folder), tmp_path/ro/ (mode 555)."""
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "taken.safetensors").mkdir()
    (tmp_path / "ro").mkdir(mode=0o555)
    os.chmod(tmp_path / "ro", 0o555)
    yield tmp_path
    os.chmod(tmp_path / "ro", 0o755)


def bad_outputs(root: Path, kind: str) -> dict[str, list[Path]]:
    """The outputs that must be refused, per case; the read-only ones need an unprivileged process."""
    if kind == "file":
        return {"in the way": [root / "taken.safetensors", root / "afile" / "out.safetensors"],
                "missing folder": [root / "missing" / "out.safetensors"],
                "read-only": [root / "ro" / "out.safetensors"]}
    return {"in the way": [root / "afile", root / "afile" / "out"],
            "missing folder": [root / "ro" / "missing" / "out"],  # a folder's missing parents are created, if they can be
            "read-only": [root / "ro", root / "ro" / "out"]}


def unprivileged() -> list[str]:
    """The prefix that starts a process bound by file permissions: nothing for a normal user; for root,
    setpriv dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (root that obeys chmod, still the owner)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): no way to make a folder unwritable to a test")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def run_unprivileged(cases: list[list[str]], probe: Path, cwd: Path, parse_only: bool = False) -> list[dict]:
    """Run the command lines in one unprivileged process (tests/cli_driver.py); it must not write in `probe`."""
    request = {"probe": str(probe), "cases": cases, "parse_only": parse_only}
    proc = subprocess.run([*unprivileged(), sys.executable, "-m", "tests.cli_driver"], cwd=cwd, env=ENV,
                          input=json.dumps(request), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["probe"] == "Permission denied", report["probe"]  # the folder is really read-only to the commands
    return report["results"]


def test_every_output_refuses_a_path_in_the_way_a_missing_folder_and_a_read_only_folder(places, monkeypatch, capsys):
    stop_commands(monkeypatch.setattr)
    monkeypatch.chdir(places)
    before = tree(places)
    read_only = []
    for words, parser, action, kind in OUTPUTS:
        for case, paths in bad_outputs(places, kind).items():
            for path in paths:
                argv = command_line(words, parser, places / "taken.safetensors", action, str(path))
                if case == "read-only" or path.is_relative_to(places / "ro"):
                    read_only.append((argv, action, path))
                    continue
                line = assert_one_error(main(argv), capsys.readouterr().err, f"argument {name_of(action)}: ", str(path))
                assert " or " in line or "; " in line  # what to do, after what is wrong
    assert len(read_only) >= len(OUTPUTS)
    results = run_unprivileged([argv for argv, _, _ in read_only], places / "ro", places, parse_only=True)
    for (argv, action, path), result in zip(read_only, results):
        line = assert_one_error(result["rc"], result["err"], f"argument {name_of(action)}: ", str(path))
        assert "is not writable (permission denied); choose another folder or change its permissions" in line, line
    assert tree(places) == before  # no output, no temporary file, no folder


def test_output_kinds(tmp_path):
    """A file's folder must exist; a folder output may be new, with missing parents (docs/tools.md's
    `make-dataset ... data/solid_black` on a fresh clone); nothing is created by the check."""
    assert output_problem(tmp_path / "a" / "b" / "new", "folder") is None
    assert output_problem(tmp_path / "new.safetensors", "file") is None
    assert output_problem(tmp_path, "folder") is None
    assert output_problem(tmp_path / "a" / "x.safetensors", "file") == (
        f"cannot write '{tmp_path / 'a' / 'x.safetensors'}': the folder '{tmp_path / 'a'}' does not exist; "
        "create it first or choose another path")
    assert tree(tmp_path) == []
    auto = OutputPath("auto")
    assert (auto.kind_of("m.safetensors"), auto.kind_of("merged-model")) == ("file", "folder")


def test_make_dataset_creates_a_new_folder_with_its_parents(tmp_path):
    out = tmp_path / "data" / "deeper" / "5_black"
    assert main(["make-dataset", "solid", "--color", "black", "--n", "1", "--size", "8", str(out)]) == 0
    assert tree(out) == ["0000.png"]


# ---------------------------------------------------------------------------------- the OS-error boundary

@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A real, small kohya LoRA of the tiny model (attention modules, rank 2)."""
    import torch

    from lora_offset.formats.kohya import kohya_state_dict, save_lora
    from lora_offset.tiny import build_tiny_components
    from lora_offset.training.networks import add_lora, unet_lora_config

    components = build_tiny_components(seed=0)
    add_lora(components["unet"], unet_lora_config(2, 2.0))
    for key, p in components["unet"].named_parameters():
        if "lora_B" in key:
            p.data = 0.01 * torch.ones(p.shape)
    folder = tmp_path_factory.mktemp("lora")
    return save_lora(folder / "a.safetensors", kohya_state_dict(components["unet"], None), {}, precision="fp32")


def test_unreadable_inputs_and_folders_where_files_go_are_one_line_each(tmp_path, lora_file, tiny_model_dir):
    """Past the parser, every command's OSError reaches lora_offset.cli.main: one line naming the path."""
    locked = tmp_path / "locked.safetensors"
    shutil.copy(lora_file, locked)
    locked_toml = tmp_path / "locked.toml"
    locked_toml.write_text('[model]\npretrained = "x"\n')
    locked_dir = tmp_path / "locked"
    locked_dir.mkdir()
    shutil.copy(lora_file, locked_dir / "a.safetensors")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    (tmp_path / "ro").mkdir()  # only the driver's proof that permissions bind it
    out, outdir = str(tmp_path / "o.safetensors"), str(tmp_path / "eval")
    lora, model = str(lora_file), str(tiny_model_dir)
    sample = ["--prompt", "x", "--n", "1", "--steps", "1", "--resolution", "32", "--out", outdir]
    cases = []
    for bad in (locked, locked_dir / "a.safetensors", folder):
        cases += [(["inspect", str(bad)], bad), (["convert", str(bad), out], bad),
                  (["resize", str(bad), out, "--rank", "1"], bad), (["merge", "--lora", str(bad), "--out", out], bad),
                  (["merge", "--base", str(bad), "--lora", lora, "--out", out], bad),
                  (["extract", "--base", str(bad), "--tuned", lora, "--rank", "1", out], bad),
                  (["eval", "--base", model, "--lora", str(bad), *sample], bad)]
    cases += [(["eval", "--base", str(locked_dir), *sample], locked_dir),
              (["eval", "--base", model, "--start-from-leak", str(locked_dir), *sample], locked_dir),
              (["train", "--config", str(locked_toml)], locked_toml), (["train", "--config", str(folder)], folder)]
    before = tree(tmp_path)
    for path in (locked, locked_toml):
        os.chmod(path, 0)
    os.chmod(tmp_path / "ro", 0o555)
    os.chmod(locked_dir, 0)
    try:
        results = run_unprivileged([argv for argv, _ in cases], tmp_path / "ro", tmp_path)
    finally:
        os.chmod(locked_dir, 0o755)
        os.chmod(tmp_path / "ro", 0o755)
    for (argv, bad), result in zip(cases, results):
        assert_one_error(result["rc"], result["err"], str(bad))
    assert tree(tmp_path) == before


def test_the_boundary_names_the_path_and_what_to_do():
    assert describe_os_error(PermissionError(errno.EACCES, "Permission denied", "x/a.safetensors")) == (
        "x/a.safetensors: permission denied; check the permissions or choose another path")
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system", "/mnt/a")) == (
        "/mnt/a: read-only file system; choose a path on a writable disk")
    assert describe_os_error(OSError(errno.EIO, "Input/output error")) == "Input/output error; check the path"


def test_an_atomic_write_that_cannot_start_is_one_error_naming_the_target(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".x.safetensors.abcdefgh.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UserError) as info:
        atomic_write_bytes(tmp_path / "x.safetensors", b"data")
    assert str(info.value) == (f"cannot write {tmp_path / 'x.safetensors'}: permission denied; check the permissions "
                               "or choose another path")  # the target, not the temporary file


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled to the last byte, where this machine lets us mount one (root), else skip."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
    try:
        with open(disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        (disk / "out").mkdir()
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_for_every_tool_and_leaves_no_temporary_file(full_disk, lora_file, capsys):
    out = full_disk / "out"
    for argv in (["convert", str(lora_file), str(out / "c.safetensors")],
                 ["resize", str(lora_file), str(out / "r.safetensors"), "--rank", "1"],
                 ["merge", "--lora", str(lora_file), "--lora", f"{lora_file}:0.5", "--out", str(out / "m.safetensors")],
                 ["make-dataset", "varied", "--n", "2", "--size", "64", str(out)]):
        line = assert_one_error(main(argv), capsys.readouterr().err, f"no space left in '{out}'", "free some space")
        assert line.startswith("error: "), line
        assert tree(out) == [], argv


def test_the_docs_show_what_the_tools_print(tmp_path, monkeypatch, capsys):
    """docs/troubleshooting.md's "What happens when…" rows for the tools quote these lines."""
    readme = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    stop_commands(monkeypatch.setattr)
    monkeypatch.chdir(tmp_path)
    for argv, line in [
        (["merge", "--lora", "x.safetensors:nan", "--out", "m.safetensors"],
         "lora-offset merge: error: argument --lora: x.safetensors:nan: the ratio nan is not a finite number; give a "
         "number from -100 to 100 (a negative ratio subtracts the LoRA)"),
        (["convert", "in.safetensors", "loras/x.safetensors"],
         "lora-offset convert: error: argument OUT: cannot write 'loras/x.safetensors': the folder 'loras' does not "
         "exist; create it first or choose another path"),
    ]:
        assert main(argv) == 2
        assert error_lines(capsys.readouterr().err) == [line]
        assert f"`{line}`" in readme
    assert tree(tmp_path) == []
