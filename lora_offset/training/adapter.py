"""The trained adapter as a kohya file: its tensors, and the ss_* metadata kohya writes for the run."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from lora_offset.config import Config
from lora_offset.formats import kohya, kohya_metadata, lycoris
from lora_offset.training import base_precision, models, optimizers
from lora_offset.training.data.buckets import resolution_size
from lora_offset.training.schedule import Calendar
from lora_offset.training.validation import validation_seed


def save_adapter(config: Config, calendar: Calendar, dataset, accelerator, unet, text_encoder, step: int,
                 started_at: float, path: Path, averaged: bool = False) -> Path:
    """The adapter in the models as a kohya file at `path`; `averaged`: they hold the EMA's weights (ema.py)."""
    t, net, z = config.training, config.network, config.noise
    unet_model = accelerator.unwrap_model(unet)
    te_model = accelerator.unwrap_model(text_encoder) if net.train_text_encoder else None
    if net.type == "lora":
        state = kohya.kohya_state_dict(unet_model, te_model)
    else:
        state = lycoris.lycoris_state_dict(unet_model, te_model)
    metadata = kohya_metadata.ss_metadata(
        output_name=t.output_name,
        network_dim=net.loha_rank if net.type == "loha" and net.loha_rank is not None else net.rank,
        network_type=net.type,
        lokr_factor=net.lokr_factor,
        more_network_args=network_args(net),
        network_alpha=net.alpha,
        conv_dim=net.conv_rank,
        conv_alpha=net.conv_alpha,
        train_text_encoder=net.train_text_encoder,
        steps=step,
        epoch=calendar.epochs_completed(step),
        resolution=resolution_size(config.dataset.resolution),
        learning_rate=t.learning_rate,
        unet_lr=t.learning_rate,
        text_encoder_lr=t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate,
        optimizer=optimizer_record(t),
        num_train_images=dataset.num_train_items,
        num_reg_images=dataset.num_reg_images,
        tag_frequency=dataset.tag_frequency,
        noise={**dataclasses.asdict(z), "prediction_type": config.model.prediction_type},
        started_at=started_at,
        finished_at=time.time(),
        seed=t.seed,
        mixed_precision=t.mixed_precision,
        prior_loss_weight=t.prior_loss_weight,
        base_model_name=config.model.pretrained,
        extra={**base_precision.metadata(config.model.base_precision, models.compute_dtype(accelerator)),
               **training_metadata(config, calendar), **dataset_metadata(config, dataset),
               **ema_and_timestep_metadata(config, averaged)},
    )
    return kohya.save_lora(path, state, metadata, precision=t.save_precision)


def network_args(net) -> dict[str, str]:
    """The [network] settings beyond dim/alpha/conv as kohya and LyCORIS record their network_args (strings)."""
    out = {}
    if net.preset != "kohya":
        out["preset"] = net.preset
    for key in ("rank_dropout", "module_dropout", "block_lr_zero_threshold"):
        if getattr(net, key):
            out[key] = str(getattr(net, key))
    for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas", "conv_block_dims",
                "conv_block_alphas"):
        value = getattr(net, key)
        if value is not None:  # kohya's form: comma-separated, or the curve's name
            out[key] = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return out


def optimizer_record(t) -> str:
    """ss_optimizer as kohya writes it: the class, then the arguments given (`Class(k=v,...)`)."""
    args = ",".join(f"{k}={v}" for k, v in t.optimizer_args.items())
    return optimizers.class_name(t.optimizer) + (f"({args})" if args else "")


def training_metadata(config: Config, calendar: Calendar) -> dict:
    """kohya's ss_* fields for the settings that ss_metadata has no argument for."""
    t, z = config.training, config.noise
    return {
        "ss_clip_skip": t.clip_skip,
        "ss_max_token_length": t.max_token_length,
        "ss_loss_type": t.loss_type,
        "ss_huber_c": t.huber_c,
        "ss_huber_schedule": t.huber_schedule,
        "ss_debiased_estimation": t.debiased_estimation,
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_lr_warmup_steps": optimizers.warmup_steps(t.lr_warmup_steps, calendar.max_steps),
        "ss_max_train_steps": calendar.max_steps,
        "ss_num_epochs": calendar.num_epochs,
        "ss_num_batches_per_epoch": calendar.batches_per_epoch,
        "ss_gradient_accumulation_steps": calendar.accumulation,
        "ss_lr_scheduler_num_cycles": t.lr_scheduler_num_cycles,
        "ss_lr_scheduler_power": t.lr_scheduler_power,
        "ss_loraplus_lr_ratio": config.network.loraplus_lr_ratio,
        "ss_network_dropout": config.network.dropout or None,  # kohya writes its --network_dropout, None when unset
        "ss_scale_weight_norms": config.network.scale_weight_norms,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_max_grad_norm": t.max_grad_norm,
        "ss_cache_latents": t.cache_latents,
        "ss_min_timestep": z.min_timestep,
        "ss_max_timestep": 1000 if z.max_timestep is None else z.max_timestep,
    }


def ema_and_timestep_metadata(config: Config, averaged: bool) -> dict:
    """lora-offset's own record of the timestep distribution (JSON: its name and the parameters it uses) and of
    the weights in the file: "ema" (with the decay and warm-up) or "trained"."""
    z, t = config.noise, config.training
    used = {"logit_normal": ("logit_mean", "logit_std"), "timestep_bias": (
        "timestep_bias_strategy", "timestep_bias_multiplier",
        *(("timestep_bias_begin", "timestep_bias_end") if z.timestep_bias_strategy == "range" else
          ("timestep_bias_portion",)))}.get(z.timestep_distribution, ())
    return {
        "lora_offset.timestep_distribution": json.dumps({"name": z.timestep_distribution,
                                                          **{k: getattr(z, k) for k in used}}),
        "lora_offset.weights": json.dumps({"weights": "ema", "ema_decay": t.ema_decay, "ema_warmup": t.ema_warmup}
                                          if averaged else {"weights": "trained"}),
    }


def dataset_metadata(config: Config, dataset) -> dict:
    """kohya's ss_datasets (each dataset and its subsets, JSON) and the masked-loss and validation fields."""
    t = config.training
    split = [d.validation_split for d in config.datasets if d.validation_split > 0]
    return {
        "ss_datasets": dataset.ss_datasets(),
        "ss_masked_loss": t.masked_loss or dataset.has_masks,
        "ss_validation_split": split[0] if split else 0.0,
        "ss_validation_seed": validation_seed(config) if split else None,
        "ss_num_validation_images": dataset.held_out,
        "ss_validate_every_n_steps": t.validate_every_n_steps if split else None,
    }
