"""kohya sd-scripts' `train_network.py` command line, as data: every option, and what lora-offset does with it.

`OPTIONS` holds each option's argparse definition as `train_network.py` builds it (its `setup_parser`
and the `add_*_arguments` of library/train_util.py, config_util.py, custom_train_functions.py,
deepspeed_utils.py, sai_model_spec.py and utils.py, sd-scripts 2026-02): name, type, default, nargs
and choices, so that a kohya command line parses here exactly as it parses there (prefix
abbreviations included). Every option is in exactly one of three groups:

* supported: translated to lora-offset's config by lora_offset.formats.kohya_args (every name not below);
* `NO_EFFECT`: accepted, one info line says why it changes nothing here;
* `REFUSED`: set to anything but kohya's default (or a value in `ACCEPTED`), it is listed in the
  one error the front end raises for all such options together, each with its reason.

(`save_model_as` and `dynamo_backend` are in both: accepted at one value, refused at the others.)

`FAMILY_OPTIONS` are options of the SDXL, SD3 and FLUX training scripts (sdxl_train_network.py,
sd3_train_network.py, flux_train_network.py) that train_network.py does not have: refused naming the
model family. Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


def int_or_float(value: str) -> int | float:
    """kohya's `int_or_float` (lr_warmup_steps, lr_decay_steps): "5%" -> 0.05, below 1 a fraction, else steps."""
    import argparse

    if value.endswith("%"):
        try:
            return float(value[:-1]) / 100.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"Value '{value}' is not a valid percentage") from None
    try:
        number = float(value)
        return int(value) if number >= 1 else number
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not an int or float") from None


@dataclass(frozen=True)
class Option:
    type: Callable | None  # None: a store_true flag
    default: Any = None
    nargs: str | None = None
    choices: tuple | None = None


FLAG = Option(None, False)


def opt(type_, default=None, nargs=None, choices=None) -> Option:
    return Option(type_, default, nargs, tuple(choices) if choices is not None else None)


SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensort", "ipex", "tvm")

# In train_network.py's order of definition.
OPTIONS: dict[str, Option] = {
    # utils.add_logging_arguments
    "console_log_level": opt(str, None, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    "console_log_file": opt(str),
    "console_log_simple": FLAG,
    # train_util.add_sd_models_arguments
    "v2": FLAG,
    "v_parameterization": FLAG,
    "pretrained_model_name_or_path": opt(str),
    "tokenizer_cache_dir": opt(str),
    # sai_model_spec.add_model_spec_arguments
    "metadata_title": opt(str),
    "metadata_author": opt(str),
    "metadata_description": opt(str),
    "metadata_license": opt(str),
    "metadata_tags": opt(str),
    "metadata_usage_hint": opt(str),
    "metadata_thumbnail": opt(str),
    "metadata_merged_from": opt(str),
    "metadata_trigger_phrase": opt(str),
    "metadata_preprocessor": opt(str),
    "metadata_is_negative_embedding": opt(str),
    # train_util.add_dataset_arguments(parser, True, True, True)
    "train_data_dir": opt(str),
    "cache_info": FLAG,
    "shuffle_caption": FLAG,
    "caption_separator": opt(str, ","),
    "caption_extension": opt(str, ".caption"),
    "caption_extention": opt(str),
    "keep_tokens": opt(int, 0),
    "keep_tokens_separator": opt(str, ""),
    "secondary_separator": opt(str),
    "enable_wildcard": FLAG,
    "caption_prefix": opt(str),
    "caption_suffix": opt(str),
    "color_aug": FLAG,
    "flip_aug": FLAG,
    "face_crop_aug_range": opt(str),
    "random_crop": FLAG,
    "debug_dataset": FLAG,
    "resolution": opt(str),
    "cache_latents": FLAG,
    "vae_batch_size": opt(int, 1),
    "cache_latents_to_disk": FLAG,
    "skip_cache_check": FLAG,
    "enable_bucket": FLAG,
    "min_bucket_reso": opt(int, 256),
    "max_bucket_reso": opt(int, 1024),
    "bucket_reso_steps": opt(int, 64),
    "bucket_no_upscale": FLAG,
    "resize_interpolation": opt(str, None, choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic",
                                                    "area"]),
    "token_warmup_min": opt(int, 1),
    "token_warmup_step": opt(float, 0),
    "alpha_mask": FLAG,
    "dataset_class": opt(str),
    "caption_dropout_rate": opt(float, 0.0),
    "caption_dropout_every_n_epochs": opt(int, 0),
    "caption_tag_dropout_rate": opt(float, 0.0),
    "reg_data_dir": opt(str),
    "in_json": opt(str),
    "dataset_repeats": opt(int, 1),
    # train_util.add_training_arguments(parser, True)
    "output_dir": opt(str),
    "output_name": opt(str),
    "huggingface_repo_id": opt(str),
    "huggingface_repo_type": opt(str),
    "huggingface_path_in_repo": opt(str),
    "huggingface_token": opt(str),
    "huggingface_repo_visibility": opt(str),
    "save_state_to_huggingface": FLAG,
    "resume_from_huggingface": FLAG,
    "async_upload": FLAG,
    "save_precision": opt(str, None, choices=[None, "float", "fp16", "bf16"]),
    "save_every_n_epochs": opt(int),
    "save_every_n_steps": opt(int),
    "save_n_epoch_ratio": opt(int),
    "save_last_n_epochs": opt(int),
    "save_last_n_epochs_state": opt(int),
    "save_last_n_steps": opt(int),
    "save_last_n_steps_state": opt(int),
    "save_state": FLAG,
    "save_state_on_train_end": FLAG,
    "resume": opt(str),
    "train_batch_size": opt(int, 1),
    "max_token_length": opt(int, None, choices=[None, 150, 225]),
    "mem_eff_attn": FLAG,
    "torch_compile": FLAG,
    "dynamo_backend": opt(str, "inductor", choices=DYNAMO_BACKENDS),
    "xformers": FLAG,
    "sdpa": FLAG,
    "vae": opt(str),
    "max_train_steps": opt(int, 1600),
    "max_train_epochs": opt(int),
    "max_data_loader_n_workers": opt(int, 8),
    "persistent_data_loader_workers": FLAG,
    "seed": opt(int),
    "gradient_checkpointing": FLAG,
    "gradient_accumulation_steps": opt(int, 1),
    "mixed_precision": opt(str, "no", choices=["no", "fp16", "bf16"]),
    "full_fp16": FLAG,
    "full_bf16": FLAG,
    "fp8_base": FLAG,
    "ddp_timeout": opt(int),
    "ddp_gradient_as_bucket_view": FLAG,
    "ddp_static_graph": FLAG,
    "clip_skip": opt(int),
    "logging_dir": opt(str),
    "log_with": opt(str, None, choices=["tensorboard", "wandb", "all"]),
    "log_prefix": opt(str),
    "log_tracker_name": opt(str),
    "wandb_run_name": opt(str),
    "log_tracker_config": opt(str),
    "wandb_api_key": opt(str),
    "log_config": FLAG,
    "noise_offset": opt(float),
    "noise_offset_random_strength": FLAG,
    "multires_noise_iterations": opt(int),
    "ip_noise_gamma": opt(float),
    "ip_noise_gamma_random_strength": FLAG,
    "multires_noise_discount": opt(float, 0.3),
    "adaptive_noise_scale": opt(float),
    "zero_terminal_snr": FLAG,
    "min_timestep": opt(int),
    "max_timestep": opt(int),
    "loss_type": opt(str, "l2", choices=["l1", "l2", "huber", "smooth_l1"]),
    "huber_schedule": opt(str, "snr", choices=["constant", "exponential", "snr"]),
    "huber_c": opt(float, 0.1),
    "huber_scale": opt(float, 1.0),
    "lowram": FLAG,
    "highvram": FLAG,
    "sample_every_n_steps": opt(int),
    "sample_at_first": FLAG,
    "sample_every_n_epochs": opt(int),
    "sample_prompts": opt(str),
    "sample_sampler": opt(str, "ddim", choices=SAMPLERS),
    "config_file": opt(str),
    "output_config": FLAG,
    "prior_loss_weight": opt(float, 1.0),
    # train_util.add_masked_loss_arguments
    "conditioning_data_dir": opt(str),
    "masked_loss": FLAG,
    # deepspeed_utils.add_deepspeed_arguments
    "deepspeed": FLAG,
    "zero_stage": opt(int, 2, choices=[0, 1, 2, 3]),
    "offload_optimizer_device": opt(str, None, choices=[None, "cpu", "nvme"]),
    "offload_optimizer_nvme_path": opt(str),
    "offload_param_device": opt(str, None, choices=[None, "cpu", "nvme"]),
    "offload_param_nvme_path": opt(str),
    "zero3_init_flag": FLAG,
    "zero3_save_16bit_model": FLAG,
    "fp16_master_weights_and_gradients": FLAG,
    # train_util.add_optimizer_arguments
    "optimizer_type": opt(str, ""),
    "use_8bit_adam": FLAG,
    "use_lion_optimizer": FLAG,
    "learning_rate": opt(float, 2e-6),
    "max_grad_norm": opt(float, 1.0),
    "optimizer_args": opt(str, None, nargs="*"),
    "lr_scheduler_type": opt(str, ""),
    "lr_scheduler_args": opt(str, None, nargs="*"),
    "lr_scheduler": opt(str, "constant"),
    "lr_warmup_steps": opt(int_or_float, 0),
    "lr_decay_steps": opt(int_or_float, 0),
    "lr_scheduler_num_cycles": opt(int, 1),
    "lr_scheduler_power": opt(float, 1),
    "fused_backward_pass": FLAG,
    "lr_scheduler_timescale": opt(int),
    "lr_scheduler_min_lr_ratio": opt(float),
    # config_util.add_config_arguments
    "dataset_config": opt(Path),
    # custom_train_functions.add_custom_train_arguments
    "min_snr_gamma": opt(float),
    "scale_v_pred_loss_like_noise_pred": FLAG,
    "v_pred_like_loss": opt(float),
    "debiased_estimation_loss": FLAG,
    "weighted_captions": FLAG,
    # train_network.setup_parser
    "cpu_offload_checkpointing": FLAG,
    "no_metadata": FLAG,
    "save_model_as": opt(str, "safetensors", choices=[None, "ckpt", "pt", "safetensors"]),
    "unet_lr": opt(float),
    "text_encoder_lr": opt(float, None, nargs="*"),
    "fp8_base_unet": FLAG,
    "network_weights": opt(str),
    "network_module": opt(str),
    "network_dim": opt(int),
    "network_alpha": opt(float, 1),
    "network_dropout": opt(float),
    "network_args": opt(str, None, nargs="*"),
    "network_train_unet_only": FLAG,
    "network_train_text_encoder_only": FLAG,
    "training_comment": opt(str),
    "dim_from_weights": FLAG,
    "scale_weight_norms": opt(float),
    "base_weights": opt(str, None, nargs="*"),
    "base_weights_multiplier": opt(float, None, nargs="*"),
    "no_half_vae": FLAG,
    "skip_until_initial_step": FLAG,
    "initial_epoch": opt(int),
    "initial_step": opt(int),
    "validation_seed": opt(int),
    "validation_split": opt(float, 0.0),
    "validate_every_n_steps": opt(int),
    "validate_every_n_epochs": opt(int),
    "max_validation_steps": opt(int),
}

# Accepted; each prints one info line with its reason.
NO_EFFECT: dict[str, str] = {
    "console_log_level": "kohya's console logging; lora-offset logs at INFO",
    "console_log_file": "kohya's console logging; lora-offset logs to the terminal",
    "console_log_simple": "kohya's console logging; lora-offset logs to the terminal",
    "tokenizer_cache_dir": "kohya downloads the tokenizer into it; lora-offset reads the tokenizer from the model",
    "vae_batch_size": "only how many images the VAE encodes at once; the latents are the same",
    "skip_cache_check": "kohya then trusts its latent cache files; lora-offset's disk cache is keyed by the "
                        "base model, the VAE and each image",
    "mem_eff_attn": "an attention kernel choice; lora-offset uses PyTorch's scaled-dot-product attention",
    "xformers": "an attention kernel choice; lora-offset uses PyTorch's scaled-dot-product attention",
    "sdpa": "lora-offset uses PyTorch's scaled-dot-product attention anyway",
    "max_data_loader_n_workers": "lora-offset reads batches in the training process (no DataLoader workers)",
    "persistent_data_loader_workers": "lora-offset reads batches in the training process (no DataLoader workers)",
    "ddp_timeout": "multi-GPU tuning of kohya's launcher; accelerate's defaults apply",
    "ddp_gradient_as_bucket_view": "multi-GPU tuning of kohya's launcher; accelerate's defaults apply",
    "ddp_static_graph": "multi-GPU tuning of kohya's launcher; accelerate's defaults apply",
    "log_prefix": "the logs go to --logging_dir itself (no prefixed, dated sub-folder)",
    "log_tracker_name": "the tracker's project is always named lora-offset",
    "log_config": "lora-offset always logs the run's settings to the tracker",
    "lowram": "a memory hint of kohya's model loading; lora-offset places the models itself",
    "highvram": "a memory hint of kohya's model loading; lora-offset places the models itself",
    "save_last_n_epochs_state": "lora-offset keeps its last 2 training states",
    "save_last_n_steps_state": "lora-offset keeps its last 2 training states",
    "cpu_offload_checkpointing": "a memory option of kohya's DiT models; gradient checkpointing here keeps "
                                 "activations on the GPU",
    "no_half_vae": "lora-offset's VAE runs in the training dtype (fp32 without a CUDA GPU); a non-finite latent "
                   "stops the step, not the run",
    "conditioning_data_dir": "train_network.py reads mask images only from a dataset config's subsets "
                             "(conditioning_data_dir there, with --masked_loss)",
    "save_model_as": "lora-offset writes .safetensors (other values are refused)",
    "dynamo_backend": "torch.compile (--torch_compile) runs with its default backend, inductor (other values are "
                      "refused)",
}

# Refused unless at kohya's default; the reasons go into the one error.
HUB = "uploading to or resuming from the Hugging Face Hub is not implemented; upload the file yourself"
DEEPSPEED = "DeepSpeed is not supported; several GPUs train with `accelerate launch --multi_gpu -m lora_offset kohya …`"
METADATA = ("lora-offset does not write the modelspec fields kohya takes from the command line "
            "(its modelspec.title is --output_name)")
REFUSED: dict[str, str] = {
    **{name: METADATA for name in ("metadata_title", "metadata_author", "metadata_description", "metadata_license",
                                   "metadata_tags", "metadata_usage_hint", "metadata_thumbnail",
                                   "metadata_merged_from", "metadata_trigger_phrase", "metadata_preprocessor",
                                   "metadata_is_negative_embedding")},
    "debug_dataset": "kohya then shows the dataset's batches instead of training",
    "dataset_class": "a custom dataset class is kohya code, which lora-offset does not run",
    "in_json": "fine-tuning datasets take captions from kohya's JSON metadata; put each caption in a .txt file "
               "beside its image (DreamBooth style) instead",
    **{name: HUB for name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
                              "huggingface_token", "huggingface_repo_visibility", "save_state_to_huggingface",
                              "resume_from_huggingface", "async_upload")},
    "save_n_epoch_ratio": "not implemented; use --save_every_n_epochs",
    "save_state_on_train_end": "lora-offset's states are for interrupted runs and none is written at the end; "
                               "to train on from a finished adapter, start from it with --network_weights",
    "full_fp16": "the LoRA weights stay fp32 (in fp16 small updates are lost to rounding); --mixed_precision "
                 "sets the compute dtype",
    "full_bf16": "the LoRA weights stay fp32 (in bf16 small updates are lost to rounding); --mixed_precision "
                 "sets the compute dtype",
    "log_tracker_config": "tracker settings from a file are not read; use --log_with, --logging_dir, --wandb_run_name",
    "wandb_api_key": "set the WANDB_API_KEY environment variable instead (wandb reads it)",
    "ip_noise_gamma_random_strength": "not implemented: --ip_noise_gamma applies at its full value",
    "huber_scale": "not implemented: the Huber loss is kohya's at scale 1",
    "dynamo_backend": "torch.compile runs with its default backend (inductor) here",
    **{name: DEEPSPEED for name in ("deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                                    "offload_param_device", "offload_param_nvme_path", "zero3_init_flag",
                                    "zero3_save_16bit_model", "fp16_master_weights_and_gradients")},
    "lr_scheduler_type": "lora-offset runs diffusers' schedulers by name (--lr_scheduler), not a class",
    "lr_scheduler_args": "lora-offset's schedulers take only --lr_warmup_steps, --lr_scheduler_num_cycles and "
                         "--lr_scheduler_power",
    "lr_decay_steps": "lora-offset's schedulers take only --lr_warmup_steps, --lr_scheduler_num_cycles and "
                      "--lr_scheduler_power",
    "lr_scheduler_timescale": "lora-offset's schedulers take only --lr_warmup_steps, --lr_scheduler_num_cycles "
                              "and --lr_scheduler_power",
    "lr_scheduler_min_lr_ratio": "lora-offset's schedulers take only --lr_warmup_steps, --lr_scheduler_num_cycles "
                                 "and --lr_scheduler_power",
    "fused_backward_pass": "not implemented (kohya fuses Adafactor's update into the backward pass)",
    "scale_v_pred_loss_like_noise_pred": "not implemented",
    "v_pred_like_loss": "not implemented",
    "weighted_captions": "not implemented: (word:1.2) weights in captions are read as plain text",
    "no_metadata": "the ss_* metadata is how web UIs recognise the file (A1111 lists a LoRA without it as "
                   "'Unknown')",
    "save_model_as": "lora-offset writes .safetensors only (pickled .ckpt/.pt files can run code when loaded)",
    "network_train_text_encoder_only": "not implemented: the UNet's LoRA always trains",
    "training_comment": "not written: lora-offset's metadata has no comment of the run",
    "base_weights": "merge those LoRAs into the base model first (lora-offset merge --base) and train on the result",
    "base_weights_multiplier": "merge those LoRAs into the base model first (lora-offset merge --base) and train on "
                               "the result",
    "skip_until_initial_step": "not implemented: continue an interrupted run with --resume",
    "initial_epoch": "not implemented: continue an interrupted run with --resume",
    "initial_step": "not implemented: continue an interrupted run with --resume",
    "validate_every_n_epochs": "not implemented: the validation loss comes every epoch, or every "
                               "--validate_every_n_steps",
    "max_validation_steps": "not implemented: the validation loss covers every held-out image",
}
# Values that a REFUSED option may still take (besides kohya's default).
ACCEPTED: dict[str, tuple] = {
    "save_model_as": ("safetensors",),
    "dynamo_backend": ("inductor",),
    "validate_every_n_epochs": (1,),  # every epoch: what lora-offset does without --validate_every_n_steps
}

SDXL, SD3, FLUX = "SDXL (sdxl_train_network.py)", "SD3 (sd3_train_network.py)", "FLUX (flux_train_network.py)"
# Options the other families' training scripts add to train_network.py's: {name: family}.
FAMILY_OPTIONS: dict[str, str] = {
    "cache_text_encoder_outputs": SDXL, "cache_text_encoder_outputs_to_disk": SDXL,
    "disable_mmap_load_safetensors": SDXL,
    **{name: SD3 for name in ("apply_lg_attn_mask", "clip_g", "clip_g_dropout_rate", "clip_l_dropout_rate",
                              "enable_scaled_pos_embed", "pos_emb_random_crop_rate", "save_clip", "save_t5xxl",
                              "t5_dropout_rate", "t5xxl_device", "t5xxl_dtype", "training_shift")},
    **{name: f"{SD3} and {FLUX}" for name in ("apply_t5_attn_mask", "clip_l", "t5xxl", "t5xxl_max_token_length",
                                              "blocks_to_swap", "logit_mean", "logit_std", "mode_scale",
                                              "weighting_scheme", "text_encoder_batch_size")},
    **{name: FLUX for name in ("ae", "controlnet_model_name_or_path", "discrete_flow_shift", "guidance_scale",
                               "model_prediction_type", "model_type", "sigmoid_scale", "split_mode",
                               "timestep_sampling")},
}
# --network_module values of other families' networks.
FAMILY_NETWORK_MODULES: dict[str, str] = {
    "networks.lora_flux": FLUX, "networks.oft_flux": FLUX, "networks.lora_sd3": SD3,
    "networks.control_net_lllite": SDXL, "networks.control_net_lllite_for_train": SDXL,
}
SD2 = "Stable Diffusion 2.x (lora-offset trains SD 1.x)"
FAMILY_FLAGS: dict[str, str] = {"v2": SD2}


def is_set(value: Any, default: Any) -> bool:
    """An option differs from kohya's default (an empty string or list counts as unset where the default is None,
    as the kohya_ss GUI writes unset fields into its config files)."""
    if default is None and value in ("", [], ()):
        return False
    return value != default
