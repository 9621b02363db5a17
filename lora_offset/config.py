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
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from lora_offset.config_values import check_keys, coerce, suggest, type_name
from lora_offset.errors import UserError
from lora_offset.formats.kohya_dataset import kohya_datasets, refuse

@dataclass
class ModelConfig:
    pretrained: str = ""  # diffusers folder | hub id | single-file SD 1.x .safetensors (.ckpt with allow_pickle)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    allow_pickle: bool = False  # .ckpt/.pt files are unpickled (weights only) only with this opt-in
    config_dir: Optional[str] = None  # diffusers config folder for a single-file checkpoint (default: SD 1.5's)
    tokenizer: Optional[str] = None  # tokenizer folder for a single-file checkpoint
    vae: Optional[str] = None  # replacement VAE: diffusers folder or single file
    # how the frozen UNet is stored while training (lora_offset/training/base_precision.py); the math runs in the
    # training dtype either way. "auto": in the training dtype.
    base_precision: Literal["auto", "fp16", "bf16", "fp32", "fp8", "nf4"] = "auto"


@dataclass
class NetworkConfig:
    rank: int = 16
    alpha: float = 8.0
    train_text_encoder: bool = False
    conv_rank: int = 0  # 0 = no conv LoRA ("LoCon")
    conv_alpha: float = 1.0
    dropout: float = 0.0
    type: Literal["lora", "loha", "lokr"] = "lora"  # LoRA, or LyCORIS's LoHa / LoKr through PEFT
    loha_rank: Optional[int] = None  # LoHa: rank of each Hadamard factor (PEFT LoHaConfig.r); None = rank
    lokr_factor: int = -1  # LoKr: PEFT LoKrConfig.decompose_factor; -1 = split near the square root
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: the up matrices learn this many times faster
    weights: Optional[str] = None  # start from this LoRA file (kohya, diffusers or PEFT)
    dim_from_weights: bool = False  # take rank/alpha/conv_rank/conv_alpha from `weights`


@dataclass
class NoiseConfig:
    offset: float = 0.1  # the fix this project is named after: per-sample, per-channel constant noise
    adaptive_offset: float = 0.0
    offset_random_strength: bool = False
    pyramid_iterations: int = 0
    pyramid_discount: float = 0.3
    input_perturbation: float = 0.0
    zero_terminal_snr: bool = False
    min_snr_gamma: float = 0.0  # 0 = off
    min_timestep: int = 0  # timesteps are drawn from [min_timestep, max_timestep)
    max_timestep: Optional[int] = None  # None: the schedule's length (1000)
    # how they are drawn (lora_offset/training/timesteps.py: OneTrainer's and SimpleTuner's definitions)
    timestep_distribution: Literal["uniform", "logit_normal", "cosmap", "timestep_bias"] = "uniform"
    logit_mean: float = 0.0  # logit_normal: sigmoid(N(mean, std)); mean > 0 leans towards the noisy end
    logit_std: float = 1.0
    timestep_bias_strategy: Literal["earlier", "later", "range"] = "later"  # SimpleTuner's --timestep_bias_*
    timestep_bias_multiplier: float = 1.0  # the biased timesteps' weight (the others weigh 1)
    timestep_bias_portion: float = 0.25  # earlier / later: the first / last int(portion * 1000) timesteps
    timestep_bias_begin: int = 0  # range: timesteps [begin, end)
    timestep_bias_end: int = 1000


@dataclass
class TrainingConfig:
    output_dir: str = "output"
    output_name: str = "lora"
    max_steps: Optional[int] = None  # optimizer steps; 1000 unless max_train_epochs is set
    max_train_epochs: Optional[int] = None  # train this many epochs instead of max_steps
    learning_rate: float = 1e-4
    text_encoder_lr: Optional[float] = None  # None: same as learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0  # steps, or a fraction of the training steps when below 1
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts: number of cycles
    lr_scheduler_power: float = 1.0  # polynomial: power of the decay
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    clip_skip: int = 1  # 1 = CLIP's last layer; 2 = the penultimate one (NAI-derived models)
    max_token_length: Literal[75, 150, 225] = 75  # caption tokens the text encoder sees (75 per chunk)
    optimizer: Literal["adamw8bit", "adamw", "pagedadamw8bit", "lion8bit", "lion", "prodigy", "adafactor",
                       "adamw_schedulefree"] = "adamw8bit"
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # keywords for the optimizer's constructor
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 = no clipping
    gradient_checkpointing: bool = True
    seed: int = 42
    save_every_steps: int = 0  # 0 = save the adapter only at the end
    save_every_n_epochs: int = 0  # also write {output_name}-{epoch:06d}.safetensors every N epochs
    save_last_n_steps: int = 0  # keep only the step files of the last N steps (0 = all)
    save_last_n_epochs: int = 0  # keep only the last N epoch files (0 = all)
    save_state_every_steps: int = 100  # resumable training state (the last 2 kept); 0 = never
    sample_every_steps: int = 0  # 0 = no sample images
    sample_every_n_epochs: int = 0  # samples at the end of every N-th epoch (wins over sample_every_steps)
    sample_at_first: bool = False  # samples before the first step
    # prompts (kohya prompt lines: "a dog --n blurry --w 768 --d 3"), or a kohya prompt file (.txt, .toml, .json)
    sample_prompts: str | list[str] = field(default_factory=list)
    sample_sampler: str = "ddim"  # kohya's names: ddim, euler, euler_a, dpmsolver++, dpm++_2m_karras, pndm, lms, heun, ...
    sample_steps: int = 20
    sample_guidance_scale: float = 7.5
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    prior_loss_weight: float = 1.0
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_c: float = 0.1  # huber / smooth_l1 threshold (kohya's default)
    huber_schedule: Literal["snr", "exponential", "constant"] = "snr"
    debiased_estimation: bool = False  # weight 1/sqrt(SNR) (kohya's debiased_estimation_loss)
    masked_loss: bool = False  # subsets' conditioning_data_dir masks weight the loss (kohya's --masked_loss)
    validate_every_n_steps: int = 0  # validation loss every N steps (0: at the end of each epoch)
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    cache_text_embeddings: bool = True  # when the text encoder is frozen and captions are fixed
    logging_dir: Optional[str] = None  # default: {output_dir}/logs
    log_with: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"
    wandb_run_name: Optional[str] = None  # default: wandb's own run name
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses/gradients in a row
    torch_compile: bool = False  # torch.compile the UNet (GPU throughput; slow first steps)
    channels_last: bool = False  # channels-last memory format for the UNet (GPU throughput)
    allow_tf32: bool = True  # TF32 matmuls on Ampere and newer GPUs
    deterministic: Optional[bool] = None  # bit-identical reruns and resumes; None: true on CPU, false on a GPU
    # EMA of the LoRA weights (lora_offset/training/ema.py); the exported adapter is the EMA's
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999
    ema_warmup: bool = True  # the decay of the k-th update is min(ema_decay, (1 + k) / (10 + k)) (k from 0)
    ema_on_cpu: bool = False  # keep the average in CPU memory (small GPUs)
    ema_save: Literal["ema", "both"] = "ema"  # "both": {output_name}.safetensors is the trained weights, -ema the EMA
    sample_with_ema: bool = True  # samples and the range monitor show the EMA weights (false: the trained ones)


@dataclass
class MonitorConfig:
    """The range monitor (lora_offset/training/monitor.py): brightness and colour of probe prompts at each sample step."""

    enabled: Optional[bool] = None  # None: on whenever samples are on
    # default: the first instance subset's class_tokens, the first class subset's, "a very dark photo", "a very bright photo"
    prompts: list[str] = field(default_factory=list)
    images: int = 2  # per prompt; image i uses seed + i
    steps: int = 10
    resolution: Optional[int] = None  # default: the dataset's
    seed: int = 0
    guidance_scale: Optional[float] = None  # default: training.sample_guidance_scale
    flip_margin: float = 0.03  # a colour flip: another channel leads the base's dominant one by this much
    dark_prompt: str = "a very dark photo"  # the probe whose mean luminance must not rise ...
    dark_rise: float = 0.05  # ... by more than this above the base model's


@dataclass
class SubsetConfig:
    image_dir: str = ""
    class_tokens: Optional[str] = None
    num_repeats: int = 1
    is_reg: bool = False
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    num_class_images: int = 0  # reg subsets: generate images with the base model until this many exist
    # kohya's caption options (names, meanings and defaults): see training/data/captions.py
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0  # the whole caption becomes "" with this probability
    caption_dropout_every_n_epochs: int = 0  # ... and in every N-th epoch
    caption_tag_dropout_rate: float = 0.0  # each (not kept) tag is dropped with this probability
    caption_separator: str = ","
    keep_tokens_separator: str = ""  # tags before it stay first (and after a second one, last)
    secondary_separator: Optional[str] = None  # replaced by caption_separator after shuffling
    enable_wildcard: bool = False  # {a|b} picks one; a multi-line caption file gives one random line
    token_warmup_min: int = 1
    token_warmup_step: float = 0  # grow the number of tags over this many steps (fraction when < 1)
    # kohya's augmentations and masks: see training/data/augment.py and masks.py
    random_crop: bool = False  # a random crop of the image scaled to cover the bucket (not with cached latents)
    color_aug: bool = False  # kohya's hue or gamma jitter (not with cached latents)
    resize_interpolation: Optional[Literal["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area",
                                           "box"]] = None  # None: Lanczos
    alpha_mask: bool = False  # the alpha channel weights the loss (masked loss)
    conditioning_data_dir: Optional[str] = None  # mask images of the same names (needs training.masked_loss)


@dataclass
class DatasetConfig:
    resolution: int | list[int] = 512  # or [width, height]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    train_data_dir: Optional[str] = None  # kohya: subfolders "10_sks dog" become instance subsets
    reg_data_dir: Optional[str] = None  # kohya: subfolders "1_dog" become regularization subsets
    validation_split: float = 0.0  # share of each instance subset's images held out for the validation loss
    validation_seed: Optional[int] = None  # shuffles the images before the split (default: training.seed)
    subsets: list[SubsetConfig] = field(default_factory=list)


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
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


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
    from lora_offset.config_rules import validate  # it imports this module

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
    return cls(**values)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
