"""The fenced blocks of README.md and docs/*.md, and the commands in them. Pure: text in, data out.

A shell block (```bash, ```sh, ```shell or ```console) carries one marker after its language
(docs/writing-docs.md):

    ```bash run      the tests run every command, in a copy of the sandbox (tests/docs_sandbox.py)
    ```bash parse    needs a GPU, SD 1.5's weights, minutes or an install: checked, not run

A TOML block may be marked ```toml config: a fragment of a lora-offset config, loaded and validated.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

SHELL = {"bash", "sh", "shell", "console"}
MARKERS = {"run", "parse"}
# CommonMark's backtick fence: 3 or more backticks, an info string without backticks (language, marker).
FENCE = re.compile(r"^(`{3,})[ \t]*([^`\s]*)[ \t]*([^`]*?)[ \t]*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, counted from 1
    language: str
    marker: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


@dataclass(frozen=True)
class Command:
    line: int  # in its file
    text: str  # as written, continuation lines joined
    words: list[str]  # shell words, comments dropped
    stdout: str | None = None  # the file of a `> FILE` redirection


def fenced_blocks(path: Path, text: str | None = None) -> list[Block]:
    """Every fenced block that starts at the beginning of a line; an unclosed one is an error."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, body, ticks = i, [], match.group(1)
        i += 1
        while i < len(lines) and not re.fullmatch(rf"{ticks}`*[ \t]*", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: a fenced block is not closed")
        blocks.append(Block(path, start + 1, match.group(2).lower(), match.group(3), "\n".join(body) + "\n"))
        i += 1
    return blocks


def commands(block: Block) -> list[Command]:
    """The block's commands: continuation lines joined, comments dropped, `a && b` split in two."""
    result, pending, first = [], "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        if not pending:
            first = block.line + 1 + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        logical, pending = pending + raw, ""
        words = shlex.split(logical, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            part, words = words[:cut], words[cut + 1:]
            stdout = None
            if ">" in part:
                at = part.index(">")
                if at != len(part) - 2:
                    raise ValueError(f"{block.path.name}:{first}: '>' must be followed by one file name")
                part, stdout = part[:at], part[at + 1]
            if any(w in ("|", ";", "<", "2>", ">>", "&", "||") for w in part):
                raise ValueError(f"{block.path.name}:{first}: the docs test takes plain commands, '&&' and "
                                 f"'> FILE' only: {logical.strip()}")
            if part:
                result.append(Command(first, logical.strip(), part, stdout))
    if pending:
        raise ValueError(f"{block.path.name}:{first}: the block ends in a continuation line")
    return result


def lora_offset_argv(words: list[str]) -> list[str] | None:
    """The `lora-offset` arguments of a command (`lora-offset …`, `python -m lora_offset …`,
    `accelerate launch [its options] -m lora_offset …`), or None for any other program."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value before the program
        words = words[1:]
    if not words:
        return None
    if words[0] == "lora-offset":
        return words[1:]
    if words[0] in ("python", "python3") and words[1:3] == ["-m", "lora_offset"]:
        return words[3:]
    if words[:2] == ["accelerate", "launch"] and "-m" in words:
        at = words.index("-m")
        if words[at + 1:at + 2] == ["lora_offset"]:
            return words[at + 2:]
    return None


def is_accelerate(words: list[str]) -> bool:
    return words[:2] == ["accelerate", "launch"]


def python_script(words: list[str]) -> str | None:
    """The script of `python path/to/script.py …`, else None."""
    if words[:1] in (["python"], ["python3"]) and len(words) > 1 and words[1].endswith(".py"):
        return words[1]
    return None
