"""The generated reference pages are current: docs/config.md and docs/cli.md are what
scripts/docs_reference.py writes from the code, and every config key has its one line of meaning in
lora_offset/config_docs.py (docs/writing-docs.md: how to add a key)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from pathlib import Path

import pytest

from lora_offset import config_docs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "docs_reference.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = load_script(SCRIPT)


def test_every_config_key_has_one_meaning_and_every_meaning_names_a_key():
    keys = reference.config_keys()
    missing = [k for k in keys if k not in config_docs.MEANINGS]
    assert not missing, f"add one line per key to MEANINGS in lora_offset/config_docs.py: {missing}"
    unknown = sorted(set(config_docs.MEANINGS) - set(keys))
    assert not unknown, f"lora_offset/config_docs.py has meanings of keys the config does not have: {unknown}"
    sections = [section for section, _ in reference.config_tables()]
    assert sorted(config_docs.SECTIONS) == sorted(sections), "one line per section in config_docs.SECTIONS"
    for key, meaning in config_docs.MEANINGS.items():
        assert meaning.strip() and "\n" not in meaning, f"{key}: one line of meaning"
        assert "|" not in meaning.replace("\\|", ""), f"{key}: write | as \\| (it is a table cell)"


def test_config_keys_are_every_field_of_every_section():
    from lora_offset.config import SECTIONS, SubsetConfig

    fields = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    fields |= {f"dataset.subsets.{f.name}" for f in dataclasses.fields(SubsetConfig)}
    assert set(reference.config_keys()) == fields - {"dataset.subsets"}


@pytest.mark.parametrize("page", sorted(reference.PAGES))
def test_the_generated_page_is_what_the_script_writes(page):
    path = reference.PAGES[page]
    expected = reference.render(page)
    actual = path.read_text(encoding="utf-8") if path.is_file() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 str(path.name), "generated"))[:40])
        pytest.fail(f"docs/{path.name} is stale: run `python scripts/docs_reference.py`\n{diff}")


def test_the_config_page_shows_each_keys_type_and_default():
    text = reference.render("config")
    assert "| `offset` | number | `0.1` |" in text  # from NoiseConfig.offset: float = 0.1
    assert '| `prediction_type` | `"epsilon"` \\| `"v_prediction"` | `"epsilon"` |' in text
    assert "| `max_steps` | integer | unset |" in text  # Optional[int] = None
    assert "| `optimizer_args` | table | `{}` |" in text
    assert "| `resolution` | integer or array of integers | `512` |" in text
    assert "## [[dataset.subsets]]" in text and "| `image_dir` | string |" in text


def test_the_cli_page_lists_every_argument_with_its_range():
    from lora_offset.cli import COMMANDS

    text = reference.render("cli")
    for command in COMMANDS:
        assert f"## lora-offset {command}\n" in text
    assert "| `--rank RANK` | new rank; with --dynamic, the largest rank a module may keep; a whole number from 1 to 1280 |" \
        in text
    assert "### lora-offset make-dataset solid" in text and "| `--json` |" in text
