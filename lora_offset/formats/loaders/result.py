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


LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _lycoris_type(suffixes) -> str | None:
    """"loha" / "lokr" when a module's suffixes make a whole LyCORIS module (A1111 network_hada.py /
    network_lokr.py `create_module`: all four hada_w*; lokr_w1 or lokr_w1_a+_b, and lokr_w2 or _a+_b)."""
    if all(k in suffixes for k in LOHA_KEYS):
        return "loha"
    has_1 = "lokr_w1" in suffixes or ("lokr_w1_a" in suffixes and "lokr_w1_b" in suffixes)
    has_2 = "lokr_w2" in suffixes or ("lokr_w2_a" in suffixes and "lokr_w2_b" in suffixes)
    return "lokr" if has_1 and has_2 else None


def _uses_alpha(suffixes) -> bool:
    """Whether the loaders scale the module by alpha: all but a LoKr whose two factors are stored whole
    (no lokr_w1_b / lokr_w2_b: A1111, ComfyUI and Forge then use 1.0)."""
    return not (any(s.startswith("lokr_") for s in suffixes) and "lokr_w1_b" not in suffixes
                and "lokr_w2_b" not in suffixes)
