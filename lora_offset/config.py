"""The training config: one TOML file, typed and validated before anything heavy is loaded.

Sections `[model] [network] [noise] [training] [monitor] [dataset]` and `[[dataset.subsets]]`, one
dataclass each; several datasets (each its own resolution, batch size and buckets) are `[[datasets]]` tables
with the keys of `[dataset]` and their own `[[datasets.subsets]]`. Every key is checked: an unknown
key is an error naming the closest valid key, a wrong type names the expected type, an out-of-range
value says what is allowed. kohya's dataset-config TOML (`[general]`, `[[datasets]]`,
`[[datasets.subsets]]`) is accepted as the dataset part (formats/kohya_dataset.py: every kohya key
is implemented or refused with the reason), and kohya's folder naming (`10_sks dog` = 10 repeats of
the class tokens "sks dog") works.

Paths are used as written (relative ones against the current folder, as kohya does).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_offset.config_rules import validate
# The sections' dataclasses live in config_schema (config_rules uses them too); they are lora_offset.config's as well.
from lora_offset.config_schema import (DatasetConfig, ModelConfig, MonitorConfig, NetworkConfig,  # noqa: F401
                                       NoiseConfig, SubsetConfig, TrainingConfig, folder_repeats)
from lora_offset.config_values import check_keys, coerce, suggest, type_name
from lora_offset.errors import UserError
from lora_offset.formats.kohya_dataset import kohya_datasets, refuse


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # [dataset], or several [[datasets]]: each its own resolution, batch size and buckets
    datasets: list[DatasetConfig] = field(default_factory=lambda: [DatasetConfig()])

    @classmethod
    def from_dict(cls, data: dict, source: str = "<config>") -> "Config":
        return _build_config(data, source)

    @property
    def dataset(self) -> DatasetConfig:
        """The first (often the only) dataset."""
        return self.datasets[0]

    def to_dict(self) -> dict:
        """Plain data (TOML-serialisable: None values dropped): `dataset` for one dataset, else `datasets`."""
        data = _drop_none(dataclasses.asdict(self))
        if len(self.datasets) == 1:
            data["dataset"] = data.pop("datasets")[0]
        return data

    @property
    def adapter_path(self) -> Path:
        return Path(self.training.output_dir) / f"{self.training.output_name}.safetensors"


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "network": NetworkConfig,
    "noise": NoiseConfig,
    "training": TrainingConfig,
    "monitor": MonitorConfig,
    "dataset": DatasetConfig,
}
SUBSET_KEYS = [f.name for f in dataclasses.fields(SubsetConfig)]
DATASET_KEYS = [f.name for f in dataclasses.fields(DatasetConfig) if f.name != "subsets"]


def load_config(path: str | Path, overrides: typing.Sequence[str] = (),
                dataset_config: str | Path | None = None) -> Config:
    """Read, override (`section.key=value`), validate. Errors name the file and the key.

    `dataset_config`: kohya's dataset-config TOML, in place of the config's [dataset] / [[datasets]]."""
    path = Path(path)
    data = read_toml(path)
    source = str(path)
    if dataset_config is not None:
        for name in ("dataset", "datasets"):
            if name in data:
                raise UserError(f"{path}: has a [{name}] section and --dataset-config {dataset_config} was given; "
                                "keep one of the two")
        data["datasets"] = kohya_datasets(read_toml(Path(dataset_config)), str(dataset_config), DATASET_KEYS,
                                          SUBSET_KEYS)
    for item in overrides:
        apply_override(data, item)
    return _build_config(data, source)


def read_toml(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; give the path of a .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line L, column C)".
        raise UserError(f"{path}: TOML syntax error: {e}") from None


def apply_override(data: dict, item: str) -> None:
    """`section.key=value` (value parsed as TOML, else taken as a string) into `data`; `dataset.key`
    applies to every dataset of a config with [[datasets]]."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set training.max_steps=500")
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise UserError(f"--set {item!r}: unknown section {section!r}{suggest(section, SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare strings: paths, names
    if section == "dataset" and isinstance(data.get("datasets"), list):
        for table in data["datasets"]:
            if isinstance(table, dict):
                table[name] = value
        return
    data.setdefault(section, {})
    if not isinstance(data[section], dict):
        raise UserError(f"--set {item!r}: [{section}] is not a table in the config")
    data[section][name] = value


def _build_config(data: dict, source: str) -> Config:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a table of sections")
    check_keys(data, [*SECTIONS, "datasets"], source, "")
    sections = {}
    for name, cls in SECTIONS.items():
        if name == "dataset":
            continue
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise UserError(f"{source}: [{name}] must be a table, got {type_name(table)}")
        sections[name] = _build_dataclass(cls, table, source, f"{name}.")
    config = Config(**sections, datasets=_build_datasets(data, source))
    validate(config, source)
    return config


def _build_datasets(data: dict, source: str) -> list[DatasetConfig]:
    """[dataset] (one table) or [[datasets]] (an array of tables with the same keys)."""
    if "dataset" in data and "datasets" in data:
        raise UserError(f"{source}: has both [dataset] and [[datasets]]; use [[datasets]] tables for several "
                        "datasets, [dataset] for one")
    if "datasets" not in data:
        table = data.get("dataset", {})
        if not isinstance(table, dict):
            raise UserError(f"{source}: [dataset] must be a table, got {type_name(table)}")
        return [_build_dataclass(DatasetConfig, table, source, "dataset.")]
    tables = data["datasets"]
    if not isinstance(tables, list) or not tables or not all(isinstance(d, dict) for d in tables):
        raise UserError(f"{source}: datasets must be one or more tables ([[datasets]], each with "
                        "[[datasets.subsets]])")
    return [_build_dataclass(DatasetConfig, d, source, f"datasets[{i}].") for i, d in enumerate(tables)]


def _build_dataclass(cls: type, table: dict, source: str, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls in (DatasetConfig, SubsetConfig):  # kohya's keys that lora-offset refuses, with the reason
        table = refuse(table, prefix, source)
    check_keys(table, list(fields), source, prefix)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in table.items():
        if cls is DatasetConfig and name == "subsets":
            if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
                raise UserError(f"{source}: {prefix}subsets must be an array of tables ([[{prefix}subsets]])")
            values[name] = [_build_dataclass(SubsetConfig, s, source, f"{prefix}subsets[{i}].")
                            for i, s in enumerate(value)]
            continue
        values[name] = coerce(value, hints[name], f"{prefix}{name}", source)
    if cls is SubsetConfig and "num_repeats" not in table and isinstance(values.get("image_dir"), str):
        values["num_repeats"] = folder_repeats(values["image_dir"])  # kohya's folder naming, unless the table sets it
    return cls(**values)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
