"""kohya sd-scripts' sample-prompt files (`--sample_prompts`), read as kohya reads them.

Three formats, chosen by the file's extension (kohya `library/train_util.py`, `load_prompts`):

.txt   one prompt per line. A line is skipped when it is empty after stripping or when its first
       character is "#" (a comment; kohya tests the unstripped line, so " # x" is a prompt). The
       line is split at " --"; the first piece is the prompt, each further piece an option:
           --n TEXT    negative prompt (up to the next " --")
           --w INT     width          --h INT   height
           --d INT     seed           --s INT   steps (kohya clamps to 1..1000)
           --l NUMBER  guidance (CFG) scale
           --ss NAME   sampler for this prompt (kohya's sampler names)
       Option names are case-insensitive, as in kohya. kohya's options for other model families
       (--g, --cn, --ctr, --rcfg, --fs) do nothing for SD 1.x there and here (one warning).
.toml  a [prompt] table of defaults and [[prompt.subset]] tables, one per prompt; each prompt is
       the [prompt] table updated by its subset (kohya: `dict(**data["prompt"], **subset)`).
.json  an array whose items are prompt lines (parsed as above) or tables.
Tables use kohya's key names: prompt, negative_prompt, width, height, seed, sample_steps, scale,
sample_sampler.

Where kohya silently ignores something, this module stops with one error naming the file and the
line (or table): an unknown option (`--wd 512`), a malformed value (`--w 512px`, `--l 7.5.1`), an
unknown table key. Two deliberate differences: options are read only after the prompt (kohya also
matches them against the prompt itself, so a prompt starting "w 100 " set the width), and a subset
may override a [prompt] key (kohya raises TypeError). Everything here is pure except
`read_sample_prompts`, which reads the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lora_offset.errors import UserError

log = logging.getLogger("lora_offset")

SUFFIXES = (".txt", ".toml", ".json")


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image's settings; None = the training config's default."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    where: str = ""  # "prompts.txt line 3": for messages about this prompt


class PromptSyntaxError(ValueError):
    """A malformed prompt line or table (the caller adds the file and line)."""


# line option -> (field, parser of its value)
def _whole_number(name: str, text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise PromptSyntaxError(f"--{name} needs a whole number, got {text!r}")
    return int(text)


def _number(name: str, text: str) -> float:
    if not re.fullmatch(r"\d+(\.\d*)?|\.\d+", text):
        raise PromptSyntaxError(f"--{name} needs a number, got {text!r}")
    return float(text)


def _text(name: str, text: str) -> str:
    if not text:
        raise PromptSyntaxError(f"--{name} needs a value")
    return text


LINE_OPTIONS = {
    "n": ("negative_prompt", _text),
    "w": ("width", _whole_number),
    "h": ("height", _whole_number),
    "d": ("seed", _whole_number),
    "s": ("steps", lambda name, text: max(1, min(1000, _whole_number(name, text)))),
    "l": ("guidance_scale", _number),
    "ss": ("sampler", _text),
}
# kohya's options for other model families (FLUX guidance, ControlNet, Lumina, SD3 flow shift):
# its SD 1.x sampling does not read them.
IGNORED_LINE_OPTIONS = ("g", "cn", "ctr", "rcfg", "fs")

# kohya's prompt-table keys -> our fields
TABLE_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "sample_steps": "steps",
    "scale": "guidance_scale",
    "sample_sampler": "sampler",
}
IGNORED_TABLE_KEYS = ("guidance_scale", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg", "flow_shift", "enum")


def parse_prompt_line(line: str, where: str = "") -> SamplePrompt:
    """One kohya prompt line -> SamplePrompt. Raises PromptSyntaxError for a bad option."""
    prompt, *options = line.strip().split(" --")
    values: dict[str, Any] = {}
    for piece in options:
        name, _, value = piece.strip().partition(" ")
        key = name.lower()
        if key in IGNORED_LINE_OPTIONS:
            log.warning("%s: --%s is not used for SD 1.x sample images (kohya ignores it too)", where or "prompt", name)
            continue
        if key not in LINE_OPTIONS:
            raise PromptSyntaxError(f"unknown option --{name}{_suggest(key, LINE_OPTIONS, '--')}; "
                                    f"options are {', '.join('--' + k for k in LINE_OPTIONS)}")
        field, parse = LINE_OPTIONS[key]
        values[field] = parse(key, value.strip())
    return SamplePrompt(prompt=prompt.strip(), where=where, **values)


def parse_prompt_table(table: dict, where: str = "") -> SamplePrompt:
    """One kohya prompt table (TOML subset or JSON object) -> SamplePrompt."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in IGNORED_TABLE_KEYS:
            log.warning("%s: %r is not used for SD 1.x sample images (kohya ignores it too)", where or "prompt", key)
            continue
        if key not in TABLE_KEYS:
            raise PromptSyntaxError(f"unknown key {key!r}{_suggest(key, TABLE_KEYS)}; keys are {', '.join(TABLE_KEYS)}")
        field = TABLE_KEYS[key]
        values[field] = _check_type(key, field, value)
    if "prompt" not in values:
        raise PromptSyntaxError("has no 'prompt'")
    return SamplePrompt(where=where, **values)


def _check_type(key: str, field: str, value: Any) -> Any:
    if field in ("prompt", "negative_prompt", "sampler"):
        if not isinstance(value, str):
            raise PromptSyntaxError(f"{key} must be a string, got {value!r}")
        return value
    if field == "guidance_scale":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise PromptSyntaxError(f"{key} must be a number >= 0, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PromptSyntaxError(f"{key} must be a whole number >= 0, got {value!r}")
    if field == "steps" and value < 1:
        raise PromptSyntaxError(f"{key} must be >= 1, got {value}")
    return value


def parse_prompt_text(text: str, source: str) -> list[SamplePrompt]:
    """The prompts of a .txt prompt file (its text); errors name `source` and the line."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line[0] == "#":
            continue
        where = f"{source} line {number}"
        prompts.append(_named(where, parse_prompt_line, line))
    return prompts


def parse_prompt_toml(data: dict, source: str) -> list[SamplePrompt]:
    """The prompts of a parsed .toml prompt file: [prompt] defaults + [[prompt.subset]] prompts."""
    defaults = data.get("prompt")
    if set(data) != {"prompt"} or not isinstance(defaults, dict):
        raise UserError(f"{source}: a TOML prompt file has one [prompt] table with [[prompt.subset]] tables "
                        f"(found {', '.join(repr(k) for k in data) or 'nothing'})")
    subsets = defaults.get("subset")
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
        raise UserError(f"{source}: [prompt] has no [[prompt.subset]] tables (one per prompt)")
    shared = {k: v for k, v in defaults.items() if k != "subset"}
    return [_named(f"{source} [[prompt.subset]] {i + 1}", parse_prompt_table, {**shared, **subset})
            for i, subset in enumerate(subsets)]


def parse_prompt_json(data: Any, source: str) -> list[SamplePrompt]:
    """The prompts of a parsed .json prompt file: an array of prompt lines or tables."""
    if not isinstance(data, list):
        raise UserError(f"{source}: a JSON prompt file is an array of prompt lines or objects")
    prompts = []
    for i, item in enumerate(data):
        where = f"{source} item {i + 1}"
        if isinstance(item, str):
            prompts.append(_named(where, parse_prompt_line, item))
        elif isinstance(item, dict):
            prompts.append(_named(where, parse_prompt_table, item))
        else:
            raise UserError(f"{where}: expected a prompt line or an object, got {item!r}")
    return prompts


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a kohya prompt file (.txt, .toml or .json). Every problem is one UserError naming the file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{path}: a sample-prompt file must end in .txt, .toml or .json (kohya's formats)")
    if not path.is_file():
        raise UserError(f"{path}: sample-prompt file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            prompts = parse_prompt_toml(tomllib.loads(text), str(path))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: TOML syntax error: {e}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: JSON syntax error: {e.msg} (line {e.lineno}, column {e.colno})") from None
        prompts = parse_prompt_json(data, str(path))
    else:
        prompts = parse_prompt_text(text, str(path))
    if not prompts:
        raise UserError(f"{path}: has no prompt (only empty and # comment lines)")
    return prompts


def prompts_from_config(value: str | Sequence[str], source: str) -> list[SamplePrompt]:
    """`training.sample_prompts`: a prompt file's path, or a list of prompt lines (kohya's syntax)."""
    if isinstance(value, str):
        try:
            return read_sample_prompts(value)
        except UserError as e:
            raise UserError(f"{source}: training.sample_prompts: {e}") from None
    return [_named(f"{source}: training.sample_prompts[{i}]", parse_prompt_line, line) for i, line in enumerate(value)]


def resolve(prompts: Sequence[SamplePrompt], *, width: int, height: int, seed: int, steps: int,
            guidance_scale: float, sampler: str) -> list[SamplePrompt]:
    """Fill each prompt's unset fields with the defaults (pure).

    Prompt i gets seed `seed + i` unless it sets one (kohya draws a random seed instead: a fixed
    one makes samples comparable across steps). Sizes are rounded down to a multiple of 8, at
    least 64, as kohya does; a missing negative prompt is "".
    """
    out = []
    for i, p in enumerate(prompts):
        w = p.width if p.width is not None else width
        h = p.height if p.height is not None else height
        out.append(dataclasses.replace(
            p,
            negative_prompt=p.negative_prompt or "",
            width=max(64, w - w % 8),
            height=max(64, h - h % 8),
            seed=p.seed if p.seed is not None else seed + i,
            steps=p.steps if p.steps is not None else steps,
            guidance_scale=p.guidance_scale if p.guidance_scale is not None else guidance_scale,
            sampler=p.sampler if p.sampler is not None else sampler,
        ))
    return out


def _named(where: str, parse, item) -> SamplePrompt:
    try:
        return parse(item, where)
    except PromptSyntaxError as e:
        raise UserError(f"{where}: {e}") from None


def _suggest(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""
