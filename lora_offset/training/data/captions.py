"""Captions: caption files, tags, kohya's caption shuffle, tag counts, length check."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

log = logging.getLogger("lora_offset.data")


def read_caption_file(path: Path) -> tuple[str, bool]:
    """(caption, read_as_latin1). The caption is the first non-empty line, stripped."""
    data = path.read_bytes()
    try:
        text, latin1 = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, latin1 = data.decode("latin-1"), True
    for line in text.splitlines():
        if line.strip():
            return line.strip(), latin1
    return "", latin1


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.strip().split(",")]


def shuffle_tags(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """kohya shuffle_caption: the first `keep_tokens` comma-separated tags stay, the rest are shuffled."""
    tags = split_tags(caption)
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if len(flex) > 1:
        flex = [flex[i] for i in torch.randperm(len(flex), generator=generator).tolist()]
    return ", ".join(fixed + flex)


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """kohya's per-folder tag count: lower-cased comma-separated tags, each caption counted once per tag."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
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
