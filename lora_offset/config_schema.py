"""The config's sections as dataclasses: the TOML schema (every key, its type and its default).

One dataclass per section (`[model] [network] [noise] [training]`, `[dataset]` / `[[datasets]]` and
their `[[...subsets]]`); lora_offset.config reads a TOML file into them and lora_offset.config_rules
checks their values. Plain data, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


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
    rank_dropout: float = 0.0  # kohya's: each rank zeroed with this probability per sample (training/network_regularizers.py)
    module_dropout: float = 0.0  # kohya's: a whole module left out of a forward pass with this probability
    type: Literal["lora", "loha", "lokr"] = "lora"  # LoRA, or LyCORIS's LoHa / LoKr through PEFT
    # which modules train (training/network_targets.py; LyCORIS's preset names): kohya's 192 + 72 by default
    preset: Literal["kohya", "attn-only", "attn-mlp", "full"] = "kohya"
    loha_rank: Optional[int] = None  # LoHa: rank of each Hadamard factor (PEFT LoHaConfig.r); None = rank
    lokr_factor: int = -1  # LoKr: PEFT LoKrConfig.decompose_factor; -1 = split near the square root
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: the up matrices learn this many times faster
    # kohya's block-wise settings (training/network_targets.py: 25 blocks, 12 down, 1 mid, 12 up)
    down_lr_weight: Optional[list[float] | str] = None  # 12 learning-rate weights, or a curve: "cosine+0.1", ...
    mid_lr_weight: Optional[float] = None
    up_lr_weight: Optional[list[float] | str] = None
    block_lr_zero_threshold: float = 0.0  # a given weight at or below it leaves its block out
    block_dims: Optional[list[int]] = None  # 25 ranks (0: the block is left out)
    block_alphas: Optional[list[float]] = None  # 25 alphas
    conv_block_dims: Optional[list[int]] = None  # 25 ranks of the 3x3 convs
    conv_block_alphas: Optional[list[float]] = None
    scale_weight_norms: Optional[float] = None  # kohya's max-norm: after each step, no module's delta norm above it
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


def folder_repeats(image_dir: str) -> int:
    """The repeats of a kohya-named folder (`10_sks dog` -> 10), else 1."""
    match = KOHYA_FOLDER.match(Path(image_dir).name)
    return int(match.group(1)) if match else 1
