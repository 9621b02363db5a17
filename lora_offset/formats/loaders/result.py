"""What one loader does with a LoRA file (`LoaderResult`), and the key helpers the oracles share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LORA_PAIRS = (  # (down/A key, up/B key) suffix spellings seen in SD 1.x LoRA files
    ("lora_down.weight", "lora_up.weight"),
    ("lora_A.weight", "lora_B.weight"),
)


@dataclass
class LoaderResult:
    """What one loader does with a LoRA file.

    applied_modules: module ids ("unet.<path>", "text_encoder.<path>") the loader patches.
    ignored_keys: keys the loader drops (silently or with a warning), sorted.
    whole_lora_rejected: the loader refuses the file or errors out: nothing applies.
    reason: one line on why keys were dropped or the file rejected ("" when all is well).
    missing_alpha: applied modules without an `.alpha` key: every loader then uses scale 1.0
        instead of alpha/rank, silently. Only meaningful for kohya-style files.
    """

    loader: str
    applied_modules: set[str] = field(default_factory=set)
    ignored_keys: list[str] = field(default_factory=list)
    whole_lora_rejected: bool = False
    reason: str = ""
    missing_alpha: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Everything in the file applies, at the scale it was trained with."""
        return not self.whole_lora_rejected and not self.ignored_keys and not self.missing_alpha and bool(self.applied_modules)


def _rejected(loader: str, keys: Iterable[str], reason: str) -> LoaderResult:
    return LoaderResult(loader, set(), sorted(keys), True, reason)


def _group(keys: Iterable[str], split) -> dict[str, dict[str, str]]:
    """{module part: {suffix part: full key}} with `split(key) -> (module, suffix)`."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        module, suffix = split(key)
        groups.setdefault(module, {})[suffix] = key
    return groups


def _first_dot(key: str) -> tuple[str, str]:
    module, _, suffix = key.partition(".")
    return module, suffix


def _lora_pair(suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    for down, up in LORA_PAIRS:
        if down in suffixes and up in suffixes:
            return down, up
    return None
