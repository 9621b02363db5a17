"""argparse types for the commands' numbers and outputs: each is checked where it is parsed.

A command declares every number it takes with its range, and every path it writes with its kind,
where it defines the argument:

    parser.add_argument("--rank", type=Number(int, 1, RANK_MAX))
    parser.add_argument("--lora", type=FileAndNumber(Number(float, -100, 100), name="ratio"))
    parser.add_argument("output", type=OutputPath("file"))

A value outside its range (nan, inf, a negative count, 1e30, ...) or an output that cannot be
written stops the command before it reads or writes anything, with argparse's one line
`lora-offset CMD: error: argument --rank: ...` naming the flag and the value. tests/test_arguments.py
walks these declarations, so a new flag is tested without a new test.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from lora_offset.fileio import output_problem

# No weight of SD 1.x has more than 1280 rows or columns, so no module can hold a higher rank.
RANK_MAX = 1280
# Seeds are 32-bit, as kohya and the web UIs write them.
SEED_MAX = 2**32 - 1


def _show(value: float) -> str:
    """A range bound as a person writes it: 1280, 0.5, 4294967295, 1e+30."""
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:g}"


@dataclass(frozen=True)
class Number:
    """`type=` for a finite int or float in [low, high] (low itself excluded when `low_open`).

    `why` says where a bound comes from, shown after the range (e.g. "no SD 1.x weight has more
    rows"). The parsed value is an int or a float."""

    kind: type
    low: float
    high: float
    low_open: bool = False
    why: str = ""

    def __post_init__(self):
        if self.kind not in (int, float) or not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"Number needs int or float and finite bounds, got {self}")

    @property
    def __name__(self) -> str:  # argparse names a type by its __name__ in some messages
        return "whole number" if self.kind is int else "number"

    def wanted(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        span = (f"above {_show(self.low)} and at most {_show(self.high)}" if self.low_open
                else f"from {_show(self.low)} to {_show(self.high)}")
        return f"give {what} {span}" + (f" ({self.why})" if self.why else "")

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if self.kind is int else 'a number'}; "
                                             f"{self.wanted()}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number; {self.wanted()}")
        if not ((self.low < value) if self.low_open else (self.low <= value)) or not value <= self.high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; {self.wanted()}")
        return value


def split_file_and_number(text: str) -> tuple[str, str | None]:
    """'FILE:NUMBER' -> ('FILE', 'NUMBER'); 'FILE' -> ('FILE', None). A ':' followed by something that
    is not a number (a Windows drive, a name with a colon) belongs to the file name. nan and inf are
    numbers here, so that they are refused as numbers instead of being taken for a file name."""
    file, sep, tail = text.rpartition(":")
    if sep and file:
        try:
            float(tail)
        except ValueError:
            return text, None
        return file, tail
    return text, None


@dataclass(frozen=True)
class FileAndNumber:
    """`type=` for FILE or FILE:NUMBER (a LoRA and its ratio): -> (Path, number), `default` without one."""

    number: Number
    default: float = 1.0
    name: str = "ratio"

    @property
    def __name__(self) -> str:
        return f"FILE[:{self.name.upper()}]"

    def __call__(self, text: str) -> tuple[Path, float]:
        file, tail = split_file_and_number(text)
        if tail is None:
            return Path(file), self.default
        try:
            return Path(file), self.number(tail)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text}: the {self.name} {e}") from None


@dataclass(frozen=True)
class OutputPath:
    """`type=` for a path the command writes. kind "file": its folder must exist (a mistyped folder is
    an error, not a surprise folder); "folder": an existing folder or a new one (created with its
    parents); "auto": a file when the name ends in `suffix`, else a folder. Returns the text as given.
    An existing folder where a file goes, a file where a folder goes, a missing folder of a file and
    a folder this process cannot write are refused (lora_offset.fileio.output_problem)."""

    kind: str
    suffix: str = ".safetensors"

    def __post_init__(self):
        if self.kind not in ("file", "folder", "auto"):
            raise ValueError(f"OutputPath kind {self.kind!r}")

    @property
    def __name__(self) -> str:
        return "output path"

    def kind_of(self, text: str) -> str:
        if self.kind != "auto":
            return self.kind
        return "file" if text.lower().endswith(self.suffix) else "folder"

    def __call__(self, text: str) -> str:
        problem = output_problem(text, self.kind_of(text))
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return text
