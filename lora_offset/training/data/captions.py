"""Captions: caption files, tags, kohya's per-step caption processing, tag counts, length check.

`process_caption` is kohya sd-scripts' `BaseDataset.process_caption` (library/train_util.py) for one
subset, step by step, with every random choice drawn from the batch's torch generator (so a batch is
still a pure function of (seed, step)) and drawn only when its option is on:
  1. caption_prefix + " " + caption + " " + caption_suffix;
  2. caption dropout: the whole caption becomes "" with probability caption_dropout_rate, and in
     every caption_dropout_every_n_epochs-th epoch (epochs counted from 1);
  3. enable_wildcard: one random line of a multi-line caption, `{a|b|c}` replaced by one of its
     options (`{{` / `}}` are literal braces); without it, the first line;
  4. when shuffle_caption, token warm-up or tag dropout is on: the tags (split at caption_separator)
     before keep_tokens_separator, or the first keep_tokens tags, stay first; a second separator
     marks tags that stay last; token warm-up keeps the first
     floor(step * (n - token_warmup_min) / token_warmup_step) + token_warmup_min of the other tags
     before token_warmup_step (a fraction of the training when below 1); then they are shuffled,
     then each is dropped with probability caption_tag_dropout_rate; the tags are joined with ", ";
  5. secondary_separator is replaced by caption_separator.
As in kohya, keep_tokens_separator stays in the caption when step 4 does not run.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Iterable

import torch

log = logging.getLogger("lora_offset.data")


def read_caption_file(path: Path, all_lines: bool = False) -> tuple[str, bool]:
    """(caption, read_as_latin1). The caption is the first non-empty line, stripped; with `all_lines`
    (enable_wildcard) every non-empty line, stripped, joined by newlines."""
    data = path.read_bytes()
    try:
        text, latin1 = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, latin1 = data.decode("latin-1"), True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if all_lines:
        return "\n".join(lines), latin1
    return (lines[0] if lines else ""), latin1


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """kohya's per-folder tag count: lower-cased comma-separated tags, each caption counted once per tag
    (the lines of a multi-line wildcard caption each count)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in re.split(r"[,\n]", caption):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def check_caption_lengths(captions: Iterable[str], tokenizer, max_token_length: int = 75) -> list[str]:
    """Warn (one warning) about captions of more than `max_token_length` tokens (BOS/EOS not counted).

    The text encoder sees only the first `max_token_length` (training.max_token_length); the rest is
    cut. Returns the long captions.
    """
    captions = list(dict.fromkeys(captions))
    if not captions:
        return []
    lengths = [len(ids) for ids in tokenizer(captions, add_special_tokens=False, truncation=False,
                                             verbose=False)["input_ids"]]
    long = [(n, c) for n, c in zip(lengths, captions) if n > max_token_length]
    if long:
        lines = "\n".join(f"  ({n} tokens) {c}" for n, c in long)
        more = "" if max_token_length == 225 else "; training.max_token_length = 150 or 225 lets it see more"
        log.warning("%d caption(s) are longer than %d tokens; the text encoder sees only the first %d%s:\n%s",
                    len(long), max_token_length, max_token_length, more, lines)
    return [c for _, c in long]


def _chance(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _choice(options: list[str], generator: torch.Generator) -> str:
    return options[int(torch.randint(len(options), (), generator=generator))]


def is_fixed(subset) -> bool:
    """True when a subset's captions are the same text every time they are used (dropout aside)."""
    return not (subset.shuffle_caption or subset.enable_wildcard or subset.caption_tag_dropout_rate > 0
                or subset.token_warmup_step > 0)


def decorated(caption: str, subset) -> str:
    """Step 1: prefix and suffix."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    return caption


def fixed_caption(caption: str, subset) -> str:
    """What process_caption gives a caption of a fixed subset (see is_fixed) when it is not dropped."""
    caption = decorated(caption, subset).split("\n")[0]
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def caption_dropped(subset, generator: torch.Generator, epoch: int) -> bool:
    """Step 2. `epoch` counts from 1, as kohya's current_epoch."""
    dropped = subset.caption_dropout_rate > 0 and _chance(generator) < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    return dropped or (every > 0 and epoch % every == 0)


def replace_wildcards(caption: str, generator: torch.Generator) -> str:
    """Step 3 with enable_wildcard: a random line, then each {a|b} replaced by one of its options."""
    if "\n" in caption:
        caption = _choice(caption.split("\n"), generator)
    open_mark, close_mark = "\u2985", "\u2986"  # kohya's placeholders for escaped braces
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: _choice(m.group(1).split("|"), generator), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def warmup_steps(token_warmup_step: float, max_steps: int | None) -> int:
    """token_warmup_step in steps; a fraction of the training when below 1 (kohya)."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * (max_steps or 0))
    return int(token_warmup_step)


def process_tags(caption: str, subset, generator: torch.Generator, step: int, max_steps: int | None) -> str:
    """Step 4: keep, warm up, shuffle and drop tags."""
    sep = subset.caption_separator
    fixed, flex, fixed_suffix = [], [], []
    keep_sep = subset.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        fixed_part, flex_part = caption.split(keep_sep, 1)
        if keep_sep in flex_part:
            flex_part, suffix_part = flex_part.split(keep_sep, 1)
            fixed_suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
    else:
        tags = [t.strip() for t in caption.strip().split(sep)]
        fixed, flex = tags[:subset.keep_tokens], tags[subset.keep_tokens:]
    warmup = warmup_steps(subset.token_warmup_step, max_steps)
    if warmup and step < warmup:
        flex = flex[:math.floor(step * ((len(flex) - subset.token_warmup_min) / warmup)) + subset.token_warmup_min]
    if subset.shuffle_caption and len(flex) > 1:
        flex = [flex[i] for i in torch.randperm(len(flex), generator=generator).tolist()]
    if subset.caption_tag_dropout_rate > 0:
        flex = [tag for tag in flex if _chance(generator) >= subset.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + fixed_suffix)


def process_caption(caption: str, subset, generator: torch.Generator, *, epoch: int, step: int,
                    max_steps: int | None = None) -> str:
    """The caption a batch uses (see the module docstring). `epoch` counts from 1; `step` is the
    optimizer step (token warm-up); `max_steps` turns a fractional token_warmup_step into steps."""
    caption = decorated(caption, subset)
    if caption_dropped(subset, generator, epoch):
        return ""
    if subset.enable_wildcard:
        caption = replace_wildcards(caption, generator)
    else:
        caption = caption.split("\n")[0]
    if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
        caption = process_tags(caption, subset, generator, step, max_steps)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption
