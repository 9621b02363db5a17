"""The rules of a built Config: ranges and cross-field checks, each failing with the key and what is
allowed; kohya's folder naming turned into subsets. Called by config.py once every value has its type."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from lora_offset.config_schema import KOHYA_FOLDER, DatasetConfig, SubsetConfig, folder_repeats
from lora_offset.config_values import suggest
from lora_offset.errors import UserError

if TYPE_CHECKING:
    from lora_offset.config import Config

log = logging.getLogger("lora_offset")


def validate(config: Config, source: str) -> None:
    """Ranges and cross-field rules, each failing with the key and what is allowed."""

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"{source}: {message}")

    m, n, z, t = config.model, config.network, config.noise, config.training
    require(bool(m.pretrained), "model.pretrained is required: a diffusers folder, a hub id or an SD 1.x .safetensors file")
    require(n.rank >= 1, f"network.rank must be >= 1, got {n.rank}")
    require(n.alpha > 0, f"network.alpha must be > 0, got {n.alpha}")
    require(n.conv_rank >= 0, f"network.conv_rank must be >= 0 (0 = off), got {n.conv_rank}")
    require(n.conv_alpha > 0, f"network.conv_alpha must be > 0, got {n.conv_alpha}")
    _validate_blocks(n, require)
    require(n.scale_weight_norms is None or n.scale_weight_norms > 0,
            f"network.scale_weight_norms must be > 0 (kohya suggests 1), got {n.scale_weight_norms}")
    require(n.conv_rank == 0 or n.preset in ("kohya", "full"),
            f"network.conv_rank trains the ResNet convs, which network.preset = \"{n.preset}\" leaves out: set "
            "conv_rank = 0, or use preset \"kohya\" or \"full\"")
    require(0 <= n.dropout < 1, f"network.dropout must be in [0, 1), got {n.dropout}")
    for key in ("rank_dropout", "module_dropout"):
        require(0 <= getattr(n, key) < 1, f"network.{key} must be in [0, 1), got {getattr(n, key)}")
    require(n.loha_rank is None or n.loha_rank >= 1, f"network.loha_rank must be >= 1, got {n.loha_rank}")
    require(n.loha_rank is None or n.type == "loha",
            f"network.loha_rank is the rank of a LoHa; it does nothing with network.type = {n.type!r}: remove it")
    require(n.lokr_factor == -1 or n.lokr_factor >= 1,
            f"network.lokr_factor must be -1 (split near the square root) or >= 1, got {n.lokr_factor}")
    require(n.lokr_factor == -1 or n.type == "lokr",
            f"network.lokr_factor shapes a LoKr; it does nothing with network.type = {n.type!r}: remove it")
    require(n.dropout == 0 or n.type == "lora",
            f"network.dropout is LoRA's dropout; PEFT's {n.type} has none of that kind: set it to 0")
    require(not (m.base_precision == "nf4" and n.type != "lora"),
            f"model.base_precision = \"nf4\" stores the base layers as bitsandbytes 4-bit layers, whose packed weight "
            f"PEFT's {n.type} cannot shape its delta to: use base_precision \"fp8\" (or \"auto\") with network.type = "
            f"{n.type!r}")
    require(z.offset >= 0, f"noise.offset must be >= 0 (0 = standard noise), got {z.offset}")
    require(z.pyramid_iterations >= 0, f"noise.pyramid_iterations must be >= 0, got {z.pyramid_iterations}")
    require(0 < z.pyramid_discount <= 1, f"noise.pyramid_discount must be in (0, 1], got {z.pyramid_discount}")
    require(z.input_perturbation >= 0, f"noise.input_perturbation must be >= 0, got {z.input_perturbation}")
    require(z.min_snr_gamma >= 0, f"noise.min_snr_gamma must be >= 0 (0 = off), got {z.min_snr_gamma}")
    max_timestep = 1000 if z.max_timestep is None else z.max_timestep
    require(0 <= z.min_timestep < max_timestep <= 1000,
            f"noise.min_timestep ({z.min_timestep}) and noise.max_timestep ({max_timestep}) must satisfy "
            "0 <= min_timestep < max_timestep <= 1000 (timesteps are drawn from [min_timestep, max_timestep))")
    _validate_timesteps(z, require)
    require(0 < t.huber_c <= 1, f"training.huber_c must be in (0, 1], got {t.huber_c}")
    require(not (z.zero_terminal_snr and m.prediction_type != "v_prediction"),
            "noise.zero_terminal_snr = true needs model.prediction_type = \"v_prediction\" "
            "(at the last timestep the input is pure noise, so an epsilon target carries no information)")
    require(t.max_steps is None or t.max_train_epochs is None,
            "training.max_steps and training.max_train_epochs are both set: keep one (kohya lets epochs win; "
            "lora-offset asks)")
    if t.max_steps is None and t.max_train_epochs is None:
        t.max_steps = 1000
    require(t.max_steps is None or t.max_steps >= 1, f"training.max_steps must be >= 1, got {t.max_steps}")
    require(t.max_train_epochs is None or t.max_train_epochs >= 1,
            f"training.max_train_epochs must be >= 1, got {t.max_train_epochs}")
    require(t.learning_rate > 0, f"training.learning_rate must be > 0, got {t.learning_rate}")
    require(t.text_encoder_lr is None or t.text_encoder_lr >= 0,
            f"training.text_encoder_lr must be >= 0, got {t.text_encoder_lr}")
    require(t.lr_warmup_steps >= 0 and (t.lr_warmup_steps < 1 or float(t.lr_warmup_steps).is_integer()),
            f"training.lr_warmup_steps must be a whole number of steps or a fraction of the training below 1 "
            f"(0.05 = 5 %), got {t.lr_warmup_steps}")
    if t.lr_warmup_steps >= 1:
        t.lr_warmup_steps = int(t.lr_warmup_steps)
    require(t.clip_skip >= 1, f"training.clip_skip must be >= 1 (1 = the last layer, 2 = the penultimate), "
                              f"got {t.clip_skip}")
    require(t.lr_scheduler_num_cycles >= 1,
            f"training.lr_scheduler_num_cycles must be >= 1, got {t.lr_scheduler_num_cycles}")
    require(t.lr_scheduler_power > 0, f"training.lr_scheduler_power must be > 0, got {t.lr_scheduler_power}")
    require(not n.weights or n.type == "lora",
            f"network.weights starts a LoRA from a LoRA file; network.type = {n.type!r} cannot start from it: "
            "remove network.weights or train a LoRA")
    require(n.loraplus_lr_ratio is None or n.type == "lora",
            f"network.loraplus_lr_ratio speeds up a LoRA's up matrices; network.type = {n.type!r} has none: remove it")
    require(not n.dim_from_weights or bool(n.weights),
            "network.dim_from_weights = true needs network.weights (the LoRA file to take the dimensions from)")
    require(n.loraplus_lr_ratio is None or n.loraplus_lr_ratio > 0,
            f"network.loraplus_lr_ratio must be > 0 (kohya suggests 16), got {n.loraplus_lr_ratio}")
    if t.optimizer == "adamw_schedulefree":
        require(t.lr_scheduler == "constant" and t.lr_warmup_steps == 0,
                "training.optimizer = \"adamw_schedulefree\" schedules itself: set training.lr_scheduler = "
                "\"constant\" and training.lr_warmup_steps = 0 (for a warm-up use "
                "training.optimizer_args = { warmup_steps = N })")
    if t.optimizer_args:
        from lora_offset.training.optimizers import check_optimizer_args

        try:
            check_optimizer_args(t.optimizer, t.optimizer_args)  # an unknown argument is an error naming it
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    require(t.gradient_accumulation_steps >= 1,
            f"training.gradient_accumulation_steps must be >= 1, got {t.gradient_accumulation_steps}")
    for key in ("save_every_steps", "save_state_every_steps", "sample_every_steps", "save_every_n_epochs",
                "save_last_n_steps", "save_last_n_epochs", "sample_every_n_epochs"):
        require(getattr(t, key) >= 0, f"training.{key} must be >= 0 (0 = off), got {getattr(t, key)}")
    require(t.sample_steps >= 1, f"training.sample_steps must be >= 1, got {t.sample_steps}")
    require(t.max_grad_norm >= 0, f"training.max_grad_norm must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
    require(t.prior_loss_weight >= 0, f"training.prior_loss_weight must be >= 0, got {t.prior_loss_weight}")
    require(t.max_nonfinite_steps >= 1, f"training.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    require(bool(t.output_name) and not re.search(r"[/\\]", t.output_name),
            f"training.output_name must be a file name without folders, got {t.output_name!r}")
    for key in ("sample_every_steps", "sample_every_n_epochs", "sample_at_first"):
        require(not getattr(t, key) or bool(t.sample_prompts),
                f"training.{key} is set but training.sample_prompts is empty: add prompts or turn it off")
    require(not t.save_last_n_steps or t.save_every_steps,
            "training.save_last_n_steps keeps the newest step files: it needs training.save_every_steps")
    require(not t.save_last_n_epochs or t.save_every_n_epochs,
            "training.save_last_n_epochs keeps the newest epoch files: it needs training.save_every_n_epochs")
    _check_scheduler_name(t.lr_scheduler, source)
    _check_sample_settings(config, source)
    _validate_ema(t, require)
    _validate_monitor(config, require)
    require(t.validate_every_n_steps >= 0,
            f"training.validate_every_n_steps must be >= 0 (0 = at the end of each epoch), got {t.validate_every_n_steps}")
    for i, d in enumerate(config.datasets):
        _validate_dataset(d, "dataset" if len(config.datasets) == 1 else f"datasets[{i}]", t, require, source)
    masked = [s for d in config.datasets for s in d.subsets if s.conditioning_data_dir]
    require(not t.masked_loss or masked,
            "training.masked_loss = true, but no subset has conditioning_data_dir (a folder of mask images); "
            "add it, or use alpha_mask = true on subsets whose images carry the mask in their alpha channel")
    require(not t.validate_every_n_steps or any(d.validation_split > 0 for d in config.datasets),
            "training.validate_every_n_steps is set, but no dataset has validation_split > 0: nothing is held "
            "out to validate on")


def _validate_blocks(n, require) -> None:
    """kohya's block-wise keys of [network] (training/network_targets.py)."""
    from lora_offset.training.network_targets import NUM_BLOCKS, lr_curve, uses_blocks

    for key in ("down_lr_weight", "up_lr_weight"):
        value = getattr(n, key)
        if isinstance(value, str):
            try:
                lr_curve(value)
            except ValueError as e:
                require(False, f"network.{key} = {value!r}: {e}, optionally with \"+base\" (e.g. \"sine+0.5\")")
        elif value is not None:
            side = "input" if key == "down_lr_weight" else "output"
            require(len(value) == 12, f"network.{key} must have 12 weights ({side}_blocks 0-11), got {len(value)}")
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        value = getattr(n, key)
        if value is None:
            continue
        require(len(value) == NUM_BLOCKS, f"network.{key} must have {NUM_BLOCKS} values (input_blocks 0-11, the "
                                          f"middle block, output_blocks 0-11), got {len(value)}")
        if key.endswith("dims"):
            require(all(d >= 0 for d in value), f"network.{key} must be ranks >= 0 (0 leaves the block out), got {value}")
        else:
            require(all(a > 0 for a in value), f"network.{key} must be alphas > 0, got {value}")
    require(n.block_lr_zero_threshold >= 0,
            f"network.block_lr_zero_threshold must be >= 0, got {n.block_lr_zero_threshold}")
    require(not (uses_blocks(n) and n.dim_from_weights),
            "network.dim_from_weights takes every module's rank from the file; remove the block-wise keys "
            "(block_dims, *_lr_weight, ...) or dim_from_weights")
    require(n.conv_block_dims is None or n.preset in ("kohya", "full"),
            f"network.conv_block_dims trains the ResNet convs, which network.preset = \"{n.preset}\" leaves out")


def _validate_timesteps(z, require) -> None:
    """noise.timestep_distribution and its parameters (lora_offset/training/timesteps.py)."""
    require(z.logit_std > 0, f"noise.logit_std must be > 0, got {z.logit_std}")
    require(z.timestep_bias_multiplier > 0,
            f"noise.timestep_bias_multiplier must be > 0 (below 1 makes the biased timesteps rarer), "
            f"got {z.timestep_bias_multiplier}")
    require(0.001 <= z.timestep_bias_portion <= 1,
            f"noise.timestep_bias_portion must be in [0.001, 1] (a share of the 1000 timesteps), got {z.timestep_bias_portion}")
    require(0 <= z.timestep_bias_begin < z.timestep_bias_end <= 1000,
            f"noise.timestep_bias_begin ({z.timestep_bias_begin}) and noise.timestep_bias_end ({z.timestep_bias_end}) "
            "must satisfy 0 <= begin < end <= 1000 (the biased timesteps are [begin, end))")
    defaults = type(z)()
    owners = {"logit_mean": "logit_normal", "logit_std": "logit_normal",
              **{f"timestep_bias_{k}": "timestep_bias" for k in ("strategy", "multiplier", "portion", "begin", "end")}}
    for key, owner in owners.items():
        require(getattr(z, key) == getattr(defaults, key) or z.timestep_distribution == owner,
                f"noise.{key} shapes noise.timestep_distribution = \"{owner}\"; it does nothing with "
                f"\"{z.timestep_distribution}\": remove it or set timestep_distribution = \"{owner}\"")
    if z.timestep_distribution == "timestep_bias":
        require(z.timestep_bias_multiplier != 1.0,
                "noise.timestep_distribution = \"timestep_bias\" with noise.timestep_bias_multiplier = 1.0 is uniform: "
                "set a multiplier (2.0 draws the biased timesteps twice as often, 0.5 half as often)")
        ranged = z.timestep_bias_strategy == "range"
        for key in ("begin", "end") if not ranged else ("portion",):
            require(getattr(z, f"timestep_bias_{key}") == getattr(defaults, f"timestep_bias_{key}"),
                    f"noise.timestep_bias_{key} does nothing with noise.timestep_bias_strategy = "
                    f"\"{z.timestep_bias_strategy}\" (" + ("earlier / later take timestep_bias_portion" if not ranged
                                                        else "range takes timestep_bias_begin and _end") + "): remove it")


def _validate_ema(t, require) -> None:
    """training.ema_* (lora_offset/training/ema.py)."""
    require(0 <= t.ema_decay < 1, f"training.ema_decay must be in [0, 1) (0 = off; 0.999 is usual), got {t.ema_decay}")
    if t.ema_decay == 0:
        for key, default in (("ema_warmup", True), ("ema_on_cpu", False), ("ema_save", "ema"), ("sample_with_ema", True)):
            require(getattr(t, key) == default,
                    f"training.{key} is an EMA setting; it does nothing without training.ema_decay: set ema_decay "
                    "(e.g. 0.999) or remove it")
    require(not (t.ema_decay and t.optimizer == "adamw_schedulefree"),
            "training.ema_decay with training.optimizer = \"adamw_schedulefree\": schedule-free AdamW averages its "
            "weights already (samples and saves use its average); remove ema_decay")


def _validate_monitor(config: Config, require) -> None:
    """[monitor] (lora_offset/training/monitor.py)."""
    mon, t = config.monitor, config.training
    sampling = bool(t.sample_every_steps or t.sample_every_n_epochs or t.sample_at_first)
    require(not mon.enabled or sampling,
            "monitor.enabled = true, but no samples are scheduled: the range monitor measures at each sample step; "
            "set training.sample_every_steps (or sample_every_n_epochs, sample_at_first)")
    require(mon.images >= 1, f"monitor.images must be >= 1, got {mon.images}")
    require(mon.steps >= 1, f"monitor.steps must be >= 1, got {mon.steps}")
    require(mon.resolution is None or (mon.resolution >= 64 and mon.resolution % 64 == 0),
            f"monitor.resolution must be a positive multiple of 64, got {mon.resolution}")
    require(mon.guidance_scale is None or mon.guidance_scale >= 0,
            f"monitor.guidance_scale must be >= 0, got {mon.guidance_scale}")
    for key in ("flip_margin", "dark_rise"):
        require(0 < getattr(mon, key) <= 1, f"monitor.{key} must be in (0, 1] (on [0, 1] RGB values), "
                                            f"got {getattr(mon, key)}")
    for i, prompt in enumerate(mon.prompts):
        require(bool(prompt.strip()), f"monitor.prompts[{i}] is empty: give the probe's text")


def _validate_dataset(d: DatasetConfig, where: str, t, require, source: str) -> None:
    """One [dataset] / [[datasets]] table and its subsets; `where` prefixes the key in messages."""
    sizes = d.resolution if isinstance(d.resolution, list) else [d.resolution]
    require(len(sizes) in (1, 2), f"{where}.resolution must be one size or [width, height], got {d.resolution}")
    for key, values in (("resolution", sizes), *((k, [getattr(d, k)]) for k in
                                                ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"))):
        for value in values:
            # SD 1.x: the VAE divides by 8 and the UNet halves the latent three times.
            require(value >= 64 and value % 64 == 0,
                    f"{where}.{key} must be a positive multiple of 64, got {getattr(d, key)}")
    require(d.batch_size >= 1, f"{where}.batch_size must be >= 1, got {d.batch_size}")
    require(d.min_bucket_reso <= d.max_bucket_reso,
            f"{where}.min_bucket_reso ({d.min_bucket_reso}) must be <= {where}.max_bucket_reso ({d.max_bucket_reso})")
    require(0 <= d.validation_split < 1, f"{where}.validation_split must be in [0, 1), got {d.validation_split}")
    _resolve_kohya_folders(d, where, source)
    require(bool(d.subsets), f"no training images configured: add [[{where}.subsets]] with image_dir, "
                             f"or set {where}.train_data_dir to a kohya-style folder")
    for i, s in enumerate(d.subsets):
        key = f"{where}.subsets[{i}]"
        require(bool(s.image_dir), f"{key}.image_dir is required")
        require(s.num_repeats >= 1, f"{key}.num_repeats must be >= 1, got {s.num_repeats}")
        require(s.keep_tokens >= 0, f"{key}.keep_tokens must be >= 0, got {s.keep_tokens}")
        require(s.num_class_images >= 0, f"{key}.num_class_images must be >= 0, got {s.num_class_images}")
        require(s.is_reg or s.num_class_images == 0,
                f"{key}.num_class_images is only for regularization subsets (is_reg = true)")
        require(not (s.is_reg and s.num_class_images > 0 and not s.class_tokens),
                f"{key}: generating class images needs class_tokens (the class prompt, e.g. \"dog\")")
        for rate in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            require(0 <= getattr(s, rate) <= 1, f"{key}.{rate} must be in [0, 1], got {getattr(s, rate)}")
        require(s.caption_dropout_every_n_epochs >= 0,
                f"{key}.caption_dropout_every_n_epochs must be >= 0 (0 = off), got {s.caption_dropout_every_n_epochs}")
        require(bool(s.caption_separator), f"{key}.caption_separator must not be empty")
        require(s.token_warmup_min >= 0, f"{key}.token_warmup_min must be >= 0, got {s.token_warmup_min}")
        require(s.token_warmup_step >= 0 and (s.token_warmup_step < 1 or float(s.token_warmup_step).is_integer()),
                f"{key}.token_warmup_step must be a whole number of steps or a fraction of the training below 1, "
                f"got {s.token_warmup_step}")
        require(s.caption_extension.startswith("."),
                f"{key}.caption_extension must start with '.', e.g. \".txt\", got {s.caption_extension!r}")
        for aug in ("random_crop", "color_aug"):
            # kohya refuses the pair too: a cached latent is one fixed crop and colour of the image.
            require(not (getattr(s, aug) and t.cache_latents),
                    f"{key}.{aug} = true changes the image at every use, so its latents cannot be cached: "
                    "set training.cache_latents = false (kohya refuses this pair too)")
        require(not (s.alpha_mask and s.conditioning_data_dir),
                f"{key} has both alpha_mask = true and conditioning_data_dir: a subset takes its masks from one "
                "of the two")
        require(not s.conditioning_data_dir or t.masked_loss,
                f"{key}.conditioning_data_dir (mask images) needs training.masked_loss = true, as kohya's "
                "--masked_loss")
    require(any(not s.is_reg for s in d.subsets), f"every subset of {where} has is_reg = true: add an instance subset")


def _check_scheduler_name(name: str, source: str) -> None:
    from lora_offset.training.optimizers import LR_SCHEDULERS, UNSUPPORTED_LR_SCHEDULERS

    if name in UNSUPPORTED_LR_SCHEDULERS:
        raise UserError(f"{source}: training.lr_scheduler {name!r} {UNSUPPORTED_LR_SCHEDULERS[name]}")
    if name not in LR_SCHEDULERS:
        raise UserError(f"{source}: training.lr_scheduler {name!r} is not a scheduler{suggest(name, LR_SCHEDULERS)}")


def _check_sample_settings(config: Config, source: str) -> None:
    """training.sample_sampler and the sample prompts (a prompt file is read here: errors come before loading)."""
    from lora_offset.experiments.sample import SAMPLERS, sampler_supports_zero_terminal_snr, zero_terminal_snr_samplers
    from lora_offset.formats.sample_prompts import prompts_from_config

    t, ztsnr = config.training, config.noise.zero_terminal_snr

    def check(sampler: str, where: str) -> None:
        if sampler not in SAMPLERS:
            raise UserError(f"{where}: sampler {sampler!r} is not one of {', '.join(SAMPLERS)}{suggest(sampler, SAMPLERS)}")
        if ztsnr and not sampler_supports_zero_terminal_snr(sampler):
            usable = ", ".join(zero_terminal_snr_samplers())
            raise UserError(f"{where}: sampler {sampler!r} cannot sample with noise.zero_terminal_snr = true; use one of {usable}")

    check(t.sample_sampler, f"{source}: training.sample_sampler")
    for prompt in prompts_from_config(t.sample_prompts, source):
        if prompt.sampler is not None:
            check(prompt.sampler, prompt.where)


def _resolve_kohya_folders(d: DatasetConfig, where: str, source: str) -> None:
    """train_data_dir/reg_data_dir subfolders -> subsets; `N_tokens` folder names -> repeats and tokens."""
    for root, is_reg, key in ((d.train_data_dir, False, f"{where}.train_data_dir"),
                              (d.reg_data_dir, True, f"{where}.reg_data_dir")):
        if root is None:
            continue
        folder = Path(root)
        if not folder.is_dir():
            raise UserError(f"{source}: {key} = {root!r} is not a folder")
        matched, ignored, no_repeats = [], [], []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            match = KOHYA_FOLDER.match(sub.name)
            (ignored if match is None else no_repeats if int(match.group(1)) == 0 else matched).append(sub)
        if ignored:
            log.warning("%s: ignored %d subfolder(s) not named <repeats>_<class tokens>: %s",
                        key, len(ignored), ", ".join(p.name for p in ignored))
        if no_repeats and matched:  # kohya skips them too: a way to leave a folder out
            log.warning("%s: skipped %d subfolder(s) named with 0 repeats, as kohya does: %s; to train on one, "
                        "rename it with its repeats per epoch, e.g. %s", key, len(no_repeats),
                        ", ".join(p.name for p in no_repeats), _renamed(no_repeats[0]))
        if no_repeats and not matched:
            raise UserError(f"{source}: {key} = {root!r}: the folder '{no_repeats[0].name}' starts with 0 repeats, "
                            f"so nothing is trained (the number before '_' is how often each image is used per "
                            f"epoch; kohya skips 0): rename it, e.g. '{_renamed(no_repeats[0])}'")
        if not matched:
            raise UserError(f"{source}: {key} = {root!r} has no subfolder named like '10_sks dog' "
                            "(<repeats>_<class tokens>)")
        d.subsets.extend(SubsetConfig(image_dir=str(p), is_reg=is_reg, num_repeats=folder_repeats(str(p)))
                         for p in matched)
    for s in d.subsets:
        match = KOHYA_FOLDER.match(Path(s.image_dir).name) if s.image_dir else None
        if match is None:
            continue
        if s.num_repeats == 0 and int(match.group(1)) == 0:  # the folder's number, taken as kohya takes it
            raise UserError(f"{source}: the image folder '{s.image_dir}' starts with 0 repeats, so nothing of "
                            "it is trained (<repeats>_<class tokens>: the number before '_' is how often each "
                            f"image is used per epoch): rename it, e.g. '{_renamed(Path(s.image_dir))}' (a subset's "
                            "num_repeats overrides the folder's number)")
        if s.class_tokens is None:
            s.class_tokens = match.group(2)


def _renamed(folder: Path) -> str:
    """A kohya folder `0_cat` as it trains: `1_cat`."""
    return "1_" + KOHYA_FOLDER.match(folder.name).group(2)
