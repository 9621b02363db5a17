"""The README's config reference lists every config key (a new key without a row fails here); its two
set-up commands are the ones CI runs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lora_offset.config import SECTIONS, SubsetConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_config_key_has_a_row_in_the_config_reference():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Config reference"):]
    table = table[:table.index("\n## ", 1)]
    listed = set(re.findall(r"^\| ([^|]+) \|", table, flags=re.M))
    keys_in_rows = {k for row in listed for k in re.findall(r"`([a-z_0-9]+)`", row)}
    missing = [f"{section}.{f.name}" for section, cls in [*SECTIONS.items(), ("dataset.subsets[]", SubsetConfig)]
               for f in dataclasses.fields(cls) if f.name != "subsets" and f.name not in keys_in_rows]
    assert not missing, f"config keys without a README row: {missing}"


def test_ci_runs_the_readmes_set_up_and_test_command():
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    setup = re.search(r"^SETUP='(.+)'$", ci, flags=re.M).group(1)
    text = README.read_text(encoding="utf-8")
    assert f"{setup} && python3 -m pytest" in text  # the test command, as CI runs it
    assert f"{setup} && lora-offset demo --out demo-out" in text  # the main job, the same set-up
    assert 'python3 -m venv "$scratch/venv"' in ci and "python3 -m pip freeze" in ci
