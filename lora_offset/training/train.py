"""Train a LoRA for Stable Diffusion 1.x: the whole run, top to bottom.

    lora-offset train --config my.toml [--set training.max_steps=500] [--resume latest]

Reading order: cheap checks (config, output folder, images) -> base model -> LoRA -> caches ->
optimizer -> resume -> the loop (one optimizer step, EMA, logs, samples and the range monitor, saves)
-> export. What one step does is in step.py; resumable states in state.py; the optimizer registry in
optimizers.py; the EMA of the weights in ema.py; the brightness-and-colour monitor in monitor.py.
Multi-GPU is accelerate's job: `accelerate launch -m lora_offset train --config my.toml`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal  # run() restores the Ctrl-C handler however train() ends
import time
from pathlib import Path

import torch

from lora_offset import fileio
from lora_offset.config import Config, load_config
from lora_offset.errors import UserError
from lora_offset.training import (base_precision, determinism, models, monitor, network_regularizers, networks, noise,
                                   trackers)
from lora_offset.training.data.captions import check_caption_lengths
from lora_offset.training.data.group import build_datasets
from lora_offset.training import optimizers
from lora_offset.training.adapter import save_adapter
from lora_offset.training.ema import adapter_files, ema_weights, make_ema
from lora_offset.training.interrupt import TrainingInterrupted, install_sigint_handler
from lora_offset.training.network_targets import block_lr_weights
from lora_offset.training.samples import generate_class_images, sampling_pipeline, write_samples
from lora_offset.training.schedule import Calendar, files_to_remove, sample_due, saves_due, total_steps
from lora_offset.training.state import STATE_DIR, find_resume_state, load_state, save_state, saved_num_threads
from lora_offset.training.step import StepParts, encode_images, optimizer_step
from lora_offset.training.text import encode_prompts, num_layers
from lora_offset.training.validation import validation_due, validation_loss, validation_seed

log = logging.getLogger("lora_offset")


def train(config: Config, resume: str | None = None, base: "models.BaseModel | None" = None,
          hooks=None) -> Path:
    """Train and export. `base` replaces loading config.model (benchmarks pass random-init SD 1.5);
    `hooks` (optional) gets `on_step_start(step)` and `on_step_end(step, loss)` around each optimizer step."""
    t, net, noise_cfg = config.training, config.network, config.noise
    output_dir = Path(t.output_dir)
    accelerator = make_accelerator(t, output_dir)
    is_main = accelerator.is_main_process
    device = accelerator.device
    weight_dtype = models.compute_dtype(accelerator)

    # ---- cheap checks first: a typo must not cost a model load ------------------------------
    start, overrides = None, None
    if net.weights:  # start from an existing LoRA: read it now, a bad file must not cost a model load
        start = networks.read_weights(net.weights)
        if net.dim_from_weights:
            net, overrides = networks.dims_from_weights(start, net)
            config = dataclasses.replace(config, network=net)
    if is_main:
        check_output_dir(output_dir, needed_bytes=estimate_adapter_bytes(net))
        # A run killed inside a save (kill -9, power cut) left the save's temporary file: clear those.
        fileio.remove_interrupted_writes(output_dir, output_dir / STATE_DIR, output_dir / "samples",
                                         output_dir / "latent_cache")
    resume_file = find_resume_state(resume, output_dir) if resume else None
    # Before anything computes: a resume continues with the settings (CPU threads) its run started with.
    restore_settings = determinism.configure(t.deterministic, device, saved_num_threads(resume_file) if resume_file else None)
    # Every process builds the global batch (batch_size x processes) and takes its slice (step.py).
    # Each dataset ([[datasets]]) keeps its own resolution, batch size and buckets (data/group.py).
    world = accelerator.num_processes
    dataset = build_datasets(config.datasets, t.seed, batch_scale=world)  # UserError if no readable image
    held_out = build_datasets(config.datasets, t.seed, batch_scale=world, part="validation")  # validation_split

    # ---- base model, frozen, in half precision on GPU -------------------------------------
    if base is None:
        base = models.load_base_model(config.model, dtype=weight_dtype)
    else:
        for module in (base.unet, base.vae, base.text_encoder):
            module.requires_grad_(False).to(weight_dtype)
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoder, base.tokenizer
    scheduler = noise.training_scheduler(base.scheduler_config, zero_terminal_snr=noise_cfg.zero_terminal_snr,
                                         prediction_type=config.model.prediction_type)
    # The UNet joins the GPU only after the caches are built and the encoders have left: the
    # VAE's encode activations and the UNet's weights are never there at the same time.
    vae.to(device)
    text_encoder.to(device)

    # Prior preservation: generate the class images that are missing, with the untouched base model.
    if generate_class_images(config, base, device):
        dataset = build_datasets(config.datasets, t.seed, batch_scale=world)
    check_caption_lengths(dataset.captions, tokenizer, t.max_token_length)
    if t.clip_skip > num_layers(text_encoder):
        raise UserError(f"training.clip_skip = {t.clip_skip} is more than the text encoder's "
                        f"{num_layers(text_encoder)} layers (SD 1.x: 12; clip skip 2 is the usual choice)")
    max_steps = total_steps(t.max_steps, t.max_train_epochs, dataset.steps_per_epoch, t.gradient_accumulation_steps)
    calendar = Calendar(max_steps, dataset.steps_per_epoch, t.gradient_accumulation_steps)

    # ---- LoRA (fp32 weights) ----------------------------------------------------------------
    unet_params, te_params = add_networks(config, unet, text_encoder, start, overrides)
    # The frozen UNet's storage (fp8, NF4, ...): after the LoRA exists (its layers stay fp32), before the GPU.
    base_precision.apply(unet, config.model.base_precision, weight_dtype)

    # ---- caches: latents and (frozen encoder) text embeddings, then move the encoders off the GPU
    if t.cache_latents:
        cache_dir = output_dir / "latent_cache" if t.cache_latents_to_disk else None
        # encoder_id: a disk cache made with another base model or VAE is never reused.
        for group in (dataset, held_out) if held_out is not None else (dataset,):
            group.cache_latents(lambda px: encode_images(vae, px, weight_dtype), cache_dir=cache_dir,
                                encoder_id=f"{config.model.pretrained}|{config.model.vae}|{weight_dtype}")
        vae.to("cpu")
    text_cache = None
    caption_sets = [g.caption_set() for g in (dataset, held_out) if g is not None]
    if t.cache_text_embeddings and not net.train_text_encoder and None not in caption_sets:
        with torch.no_grad():
            text_cache = {c: encode_prompts(tokenizer, text_encoder, [c], t.clip_skip, t.max_token_length)[0].cpu()
                          for c in sorted(set().union(*caption_sets))}
        text_encoder.to("cpu")
    unet.to(device)
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)

    # ---- optimizer and learning-rate schedule -----------------------------------------------
    te_lora = lora_parameters(text_encoder) if te_params else {}
    groups = optimizers.param_groups(t.optimizer, lora_parameters(unet), te_lora, t.learning_rate, t.text_encoder_lr,
                                     net.loraplus_lr_ratio, block_lr_weights(net))
    optimizer = optimizers.make_optimizer(t.optimizer, groups, t.weight_decay, t.optimizer_args)
    lr_scheduler = optimizers.make_lr_scheduler(t, optimizer, max_steps)
    if net.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)

    # The EMA of the LoRA weights (training.ema_decay), from the weights before the first step.
    ema = make_ema(t, {"unet": accelerator.unwrap_model(unet), "text_encoder": accelerator.unwrap_model(text_encoder)})

    # ---- resume: adapter weights, optimizer, schedule, RNG, step, EMA ------------------------
    generator = torch.Generator(device="cpu").manual_seed(t.seed + 1)  # noise, timesteps: independent of data order
    step = 0
    started_at = time.time()
    if resume_file is not None:
        step, started_at = load_state(resume_file, unet, text_encoder, optimizer, lr_scheduler, generator, accelerator,
                                      t.optimizer, ema)
        log.info("resumed from %s at step %d", resume_file, step)
    parts = StepParts(
        config=config, accelerator=accelerator, unet=unet,
        forward_unet=torch.compile(unet) if t.torch_compile else unet,
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_cache=text_cache, optimizer=optimizer,
        trainable=unet_params + te_params, dataset=dataset, generator=generator,
        alphas_cumprod=scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
        num_train_timesteps=scheduler.config.num_train_timesteps, weight_dtype=weight_dtype, max_steps=max_steps,
    )

    if is_main:
        init_kwargs = trackers.init_kwargs(t.log_with, t.wandb_run_name, logging_dir(t, output_dir))
        accelerator.init_trackers("lora-offset", config=flat_hparams(config), init_kwargs=init_kwargs)
    # Brightness and colour of the probe prompts at each sample step ([monitor]; rows kept up to a resumed step).
    ranges = monitor.for_run(config, base.scheduler_config, accelerator.log, step) if is_main else None
    shown = "ema" if ema is not None and t.sample_with_ema else "trained"  # the weights samples and the monitor show
    stop = install_sigint_handler()
    nonfinite_in_a_row = 0
    skipped_steps = 0

    def outputs(step: int, suffixes: list[str], samples: bool = True) -> None:
        """Samples and the range monitor (when due) and the adapter files `suffixes`, with the weights they show:
        schedule-free's average, the EMA's where the config says so (main process)."""
        accelerator.wait_for_everyone()
        if not is_main:
            return
        with optimizers.schedule_free_eval(t.optimizer, optimizer, parts.trainable):
            if samples and sample_due(t, calendar, step):
                with ema_weights(ema, shown == "ema"), sampling_pipeline(config, accelerator, base, unet, text_encoder,
                                                                         device) as pipe:
                    write_samples(config, accelerator, pipe, base.scheduler_config, step)
                    if ranges is not None:
                        ranges.at_sample_step(pipe, step, shown)
            for suffix in suffixes:
                for name, averaged in adapter_files(t, ema, suffix):  # the EMA's, or (ema_save "both") each
                    with ema_weights(ema, averaged):
                        save_adapter(config, calendar, dataset, accelerator, unet, text_encoder, step, started_at,
                                     output_dir / name, averaged)
        for old in files_to_remove(output_dir, t.output_name, t, suffixes, step, calendar.epochs_completed(step)):
            old.unlink(missing_ok=True)

    from tqdm.auto import tqdm

    progress = tqdm(total=max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    if step == 0 and sample_due(t, calendar, 0):
        outputs(0, [])
    # ---- the loop -----------------------------------------------------------------------------
    while step < max_steps:
        if hooks is not None:
            hooks.on_step_start(step)
        loss = optimizer_step(parts, step)
        stepped = math.isfinite(loss)
        if stepped:
            nonfinite_in_a_row = 0
        else:  # a skipped step still counts towards max_steps and the schedule
            nonfinite_in_a_row += 1
            skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step + 1, nonfinite_in_a_row)
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise UserError(
                    f"stopped: {nonfinite_in_a_row} steps in a row had a non-finite loss or gradient. "
                    "Typical cause: training.mixed_precision = \"fp16\" on a GPU without proper fp16 support; "
                    "try \"bf16\" or \"no\", or lower training.learning_rate"
                )
        lr_scheduler.step()
        step += 1
        progress.update(1)
        if stepped:
            if ema is not None:
                ema.update()
            if hooks is not None:
                hooks.on_step_end(step, loss)
            # the UNet's learning rate now (the first group may run at a block's share of it)
            lr = lr_scheduler.get_last_lr()[0] * t.learning_rate / lr_scheduler.base_lrs[0]
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": loss, "lr": lr, "skipped_steps": skipped_steps,
                             "epoch": calendar.epochs_completed(step)}, step=step)
            if parts.max_norm_stats is not None:  # kohya's max_norm/* values: the modules scaled back this step
                accelerator.log({f"max_norm/{k}": v for k, v in vars(parts.max_norm_stats).items()}, step=step)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", keys_scaled=parts.max_norm_stats.keys_scaled)
        if held_out is not None and validation_due(t, calendar, step):  # every process takes its share
            with optimizers.schedule_free_eval(t.optimizer, optimizer, parts.trainable):
                val_loss = validation_loss(parts, held_out, validation_seed(config))
            accelerator.log({"loss/validation": val_loss}, step=step)
            log.info("step %d: validation loss %.6f", step, val_loss)

        # ---- samples, intermediate adapters, then the resumable state (main process writes; everyone waits).
        # The state comes last: a state of step N promises that every file of step N is on disk, so a
        # kill anywhere in between resumes from step N-1 and writes them again.
        saves = [""] if stop.requested else saves_due(t, calendar, step)
        if saves or sample_due(t, calendar, step):
            outputs(step, saves)
        if stop.requested or (t.save_state_every_steps and step % t.save_state_every_steps == 0 and step < max_steps):
            accelerator.wait_for_everyone()
            if is_main:
                save_state(output_dir, step, started_at, unet, text_encoder, optimizer, lr_scheduler, generator,
                           accelerator, t.optimizer, ema)
        if stop.requested:
            progress.close()
            accelerator.end_training()
            stop.restore()
            restore_settings()
            raise TrainingInterrupted(
                f"interrupted at step {step}: state saved in {output_dir / STATE_DIR}; continue with\n"
                f"  lora-offset train --config <your config> --resume latest"
            )

    progress.close()
    # ---- export: the adapter (the EMA's, with training.ema_decay), the monitor's plot ------------
    outputs(step, [""], samples=False)
    adapter_path = config.adapter_path
    if is_main:
        if ranges is not None and ranges.rows:
            log.info("range monitor: %s, %s", ranges.path, monitor.write_plot(ranges.path))
        log.info("saved %s", ", ".join(str(output_dir / name) for name, _ in adapter_files(t, ema, "")))
    accelerator.end_training()
    stop.restore()
    restore_settings()
    return adapter_path


# ---------------------------------------------------------------------------------------------------
# The pieces train() calls, in the order it calls them.


def make_accelerator(t, output_dir: Path):
    """accelerate: devices, processes, mixed precision, gradient accumulation, the tracker."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # mixed precision; a second run in one Python process (a notebook, a script training two LoRAs)
    # starts from a clean one. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    mixed_precision = t.mixed_precision
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        log.warning("training.mixed_precision = \"fp16\" needs a CUDA GPU; training in fp32 on this machine")
        mixed_precision = "no"
    # On a machine without CUDA, processes started by `accelerate launch --multi_gpu` (torchrun) must be
    # told they are CPU processes, or accelerate treats each one as a separate single-process run.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_processes,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=trackers.trackers(t.log_with) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(logging_dir(t, output_dir))),
    )


def logging_dir(t, output_dir: Path) -> Path:
    return Path(t.logging_dir) if t.logging_dir else output_dir / "logs"


def check_output_dir(output_dir: Path, needed_bytes: int) -> None:
    """The output folder can be created and written, with room for one save: checked before the model loads."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"training.output_dir = '{output_dir}' is a file; give a folder path")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"training.output_dir = '{output_dir}' is not writable: {e.strerror}") from None
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise UserError(f"training.output_dir = '{output_dir}' has {free / 2**20:.0f} MiB free; "
                        f"a save needs about {needed_bytes / 2**20:.0f} MiB")


def estimate_adapter_bytes(net) -> int:
    # SD 1.5 UNet attention LoRA: ~0.85 M parameters per unit of rank; x4 for fp32 state with optimizer moments.
    return int(0.85e6 * (net.rank + net.conv_rank) * 4 * 3) + (16 << 20)


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if networks.is_adapter_parameter(n)}


def add_networks(config: Config, unet, text_encoder, start=None, overrides=None) -> tuple[list, list]:
    """Inject the LoRA (fp32 weights) into the UNet and, if trained, the text encoder; start it from the
    file `start` (network.weights) if given; set training modes. `overrides`: per-module (rank, alpha)
    of network.dim_from_weights. Returns (UNet LoRA parameters, text-encoder LoRA parameters)."""
    from accelerate.utils import set_seed

    t, net = config.training, config.network
    overrides = overrides or {}
    set_seed(t.seed)  # LoRA init draws from the global RNG: same seed, same starting adapter
    unet_config, te_config = networks.network_configs(net, overrides)  # LoRA, LoHa or LoKr (network.type)
    unet_params = networks.add_lora(unet, unet_config)
    te_params = []
    if net.train_text_encoder:
        te_params = networks.add_lora(text_encoder, te_config)
    if net.type == "lora":  # kohya's rank / module dropout (LoHa and LoKr have PEFT's, in their configs)
        for model in (unet, text_encoder) if net.train_text_encoder else (unet,):
            network_regularizers.add_rank_module_dropout(model, net.rank_dropout, net.module_dropout)
    if start is not None:
        count = networks.load_weights(start, unet, text_encoder if net.train_text_encoder else None)
        log.info("started the LoRA from %s (%d modules)", start.path, count)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if net.train_text_encoder:
            text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    unet.train()
    text_encoder.train(net.train_text_encoder)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.allow_tf32 = t.allow_tf32
    return unet_params, te_params


def flat_hparams(config: Config) -> dict:
    flat = {}
    for section, values in config.to_dict().items():
        if not isinstance(values, dict):  # several [[datasets]]: each dataset's keys are in the adapter's metadata
            continue
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}/{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set training.max_steps=500 (repeatable)")
    parser.add_argument("--dataset-config", help="kohya dataset config TOML ([general], [[datasets]], [[datasets.subsets]])")
    parser.add_argument("--resume", metavar="latest|DIR|FILE",
                        help="continue from a saved training state: 'latest' in training.output_dir, a folder, or a file")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args.overrides, dataset_config=args.dataset_config)
    return run_training(config, args.resume, again=f"lora-offset train --config {args.config} --resume latest")


def run_training(config: Config, resume: str | None, again: str) -> int:
    """train() for a command: Ctrl-C -> 130, a full disk -> how to continue (`again`: the command that resumes)."""
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        path = train(config, resume=resume)
    except TrainingInterrupted as e:
        log.warning("%s", e)
        return 130
    except fileio.DiskFullError as e:  # what was saved before is intact: say how to go on from it
        states = sorted((Path(config.training.output_dir) / STATE_DIR).glob("state-*.pt"))
        then = f"; then continue from {states[-1].name} with: {again}" if states else "; then run again"
        raise UserError(f"{e}{then}") from None
    finally:  # however train() ended, Ctrl-C means what it meant before
        signal.signal(signal.SIGINT, ctrl_c)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch, only the main process reports
        print(f"saved {path}")
    return 0
