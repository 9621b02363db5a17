"""The documentation's commands work as written (docs/writing-docs.md says how to mark a block).

- Every shell block of README.md and docs/*.md is marked `run` or `parse`.
- A ```bash run block runs, command by command, in a fresh copy of the sandbox (tests/docs_sandbox.py:
  tiny stand-ins under the names the docs use), each `lora-offset` command in this process with the
  options of docs_sandbox.FAST appended (2 training steps at 64 px, 1 eval image of 2 steps), any other
  command through bash; each must exit 0.
- A ```bash parse block (needs a GPU, SD 1.5's weights, minutes, or an install) is checked without
  running: bash parses it (`bash -n`); each `lora-offset` command (also under `accelerate launch` or
  `python -m lora_offset`) is parsed by its command's parser, `train`'s config is loaded and
  validated, `kohya`'s arguments are read by kohya's parser with no option left over; each
  `python SCRIPT.py` names a script of the repository.
- A ```toml block is TOML; a ```toml config block is also a valid lora-offset config fragment.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.docs_blocks import (MARKERS, SHELL, commands, fenced_blocks, is_accelerate, lora_offset_argv,
                               python_script)
from tests.docs_sandbox import FAST, REPO, SANDBOX, build_sandbox

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
SHELL_BLOCKS = [b for b in BLOCKS if b.language in SHELL]
RUN = [b for b in SHELL_BLOCKS if b.marker == "run"]
PARSE = [b for b in SHELL_BLOCKS if b.marker == "parse"]
TOML = [b for b in BLOCKS if b.language == "toml"]
# What a ```toml config fragment is completed with before it is loaded (each key of the fragment wins).
CONFIG_BASE = {"model": {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
               "dataset": {"subsets": [{"image_dir": "data/sks_dog"}]}}


def where(block) -> str:
    return block.where


@pytest.fixture(scope="module")
def sandbox(tiny_model_dir, tmp_path_factory) -> Path:
    return build_sandbox(tmp_path_factory.mktemp("docs") / "sandbox", tiny_model_dir)


def test_every_shell_block_is_marked_run_or_parse():
    unmarked = [f"{b.where} (```{b.language} {b.marker})" for b in SHELL_BLOCKS if b.marker not in MARKERS]
    assert not unmarked, f"mark each as ```bash run or ```bash parse (docs/writing-docs.md): {unmarked}"
    assert RUN and PARSE  # the extraction found the blocks at all


def test_the_sandbox_holds_what_writing_docs_lists(sandbox):
    missing = [name for name in SANDBOX if not (sandbox / name).exists()]
    assert not missing, missing
    page = (REPO / "docs" / "writing-docs.md").read_text(encoding="utf-8")
    unlisted = [name for name in SANDBOX if f"`{name}`" not in page]
    assert not unlisted, f"docs/writing-docs.md does not list these sandbox entries: {unlisted}"
    for command, options in FAST.items():
        assert f"`{command}`: `{' '.join(options)}`" in page  # its FAST options are documented


def run_lora_offset(argv: list[str], stdout_file: str | None, where: str) -> None:
    from lora_offset.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if stdout_file is not None:
        Path(stdout_file).write_text(out.getvalue(), encoding="utf-8")
    assert code == 0, f"{where}: `lora-offset {' '.join(argv)}` exited {code}:\n{err.getvalue()[-4000:]}"


@pytest.mark.parametrize("block", RUN, ids=where)
def test_run_block(block, sandbox, tmp_path, monkeypatch):
    work = tmp_path / "sandbox"
    shutil.copytree(sandbox, work)
    monkeypatch.chdir(work)
    for command in commands(block):
        at = f"{block.path.name}:{command.line}"
        argv = lora_offset_argv(command.words)
        assert not is_accelerate(command.words), f"{at}: accelerate launch needs processes: mark the block parse"
        if argv is None:
            done = subprocess.run(["bash", "-c", command.text], cwd=work, capture_output=True, text=True)
            assert done.returncode == 0, f"{at}: `{command.text}` exited {done.returncode}:\n{done.stderr}"
            continue
        run_lora_offset(argv + FAST.get(argv[0], []), command.stdout, at)


def parse_lora_offset(argv: list[str], at: str) -> None:
    """What --help level means: the command's own parser takes the arguments; nothing runs."""
    from lora_offset.cli import COMMANDS, build_parser

    assert argv and argv[0] in COMMANDS, f"{at}: `lora-offset {' '.join(argv)}`: no such command"
    if argv[0] == "kohya":
        from lora_offset.formats.kohya_args import parse_command_line

        problems = parse_command_line(argv[1:]).problems
        assert not problems, f"{at}: kohya's parser leaves these over: {problems}"
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser({argv[0]: COMMANDS[argv[0]]}).parse_args(argv)
    except SystemExit:
        pytest.fail(f"{at}: `lora-offset {' '.join(argv)}` does not parse:\n{err.getvalue()}")
    if argv[0] == "train":
        from lora_offset.config import load_config
        from lora_offset.errors import UserError

        try:
            load_config(args.config, args.overrides, args.dataset_config)
        except UserError as e:
            pytest.fail(f"{at}: the config of `lora-offset {' '.join(argv)}` does not load: {e}")


@pytest.mark.parametrize("block", PARSE, ids=where)
def test_parse_block(block, sandbox, monkeypatch):
    syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block.where}: bash cannot parse the block:\n{syntax.stderr}"
    monkeypatch.chdir(sandbox)
    for command in commands(block):
        at = f"{block.path.name}:{command.line}"
        argv = lora_offset_argv(command.words)
        if argv is not None:
            parse_lora_offset(argv, at)
        elif (script := python_script(command.words)) is not None:
            assert (REPO / script).is_file(), f"{at}: {script} is not a script of the repository"


def merged(base: dict, fragment: dict) -> dict:
    out = dict(base)
    for key, value in fragment.items():
        out[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@pytest.mark.parametrize("block", TOML, ids=where)
def test_toml_block(block):
    from lora_offset.config import Config
    from lora_offset.errors import UserError

    try:
        data = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as e:
        pytest.fail(f"{block.where}: not TOML: {e}")
    if block.marker == "config":
        try:
            Config.from_dict(merged(CONFIG_BASE, data), source=block.where)
        except UserError as e:
            pytest.fail(str(e))


def test_blocks_and_commands_are_read_as_markdown_and_the_shell_read_them():
    page = ("text\n```bash run\nlora-offset inspect a.safetensors   # a comment\nlora-offset merge --lora a \\\n"
            "    --out b.safetensors\nmkdir -p x && lora-offset kohya --print-config > my.toml\n```\n"
            "```` ```bash parse ```` is prose, not a fence\n````bash\n```nested```\n````\n")
    run, unmarked = fenced_blocks(Path("page.md"), page)
    assert (run.line, run.language, run.marker, unmarked.line, unmarked.marker) == (2, "bash", "run", 9, "")
    found = [(c.line, c.words, c.stdout) for c in commands(run)]
    assert found == [(3, ["lora-offset", "inspect", "a.safetensors"], None),
                     (4, ["lora-offset", "merge", "--lora", "a", "--out", "b.safetensors"], None),
                     (6, ["mkdir", "-p", "x"], None), (6, ["lora-offset", "kohya", "--print-config"], "my.toml")]
    assert lora_offset_argv(["accelerate", "launch", "--multi_gpu", "-m", "lora_offset", "train"]) == ["train"]
    assert lora_offset_argv(["HF_HOME=x", "python3", "-m", "lora_offset", "eval"]) == ["eval"]
    assert lora_offset_argv(["pip", "install", "lora-offset"]) is None
    with pytest.raises(ValueError, match="plain commands"):
        commands(fenced_blocks(Path("p.md"), "```bash run\nlora-offset inspect a | head\n```\n")[0])
    with pytest.raises(ValueError, match="not closed"):
        fenced_blocks(Path("p.md"), "```bash run\nlora-offset inspect a\n")
