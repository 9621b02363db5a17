"""Train a LoRA for Stable Diffusion 1.x: the whole loop, top to bottom.

    lora-offset train --config my.toml [--set training.max_steps=500] [--resume latest]

Reading order: cheap checks (config, output folder, images) -> base model -> LoRA -> caches ->
optimizer -> resume -> the loop (noise, timesteps, loss, step, logs, samples, saves) -> export.
Multi-GPU is accelerate's job: `accelerate launch -m lora_offset train --config my.toml`.
Every process computes the same global batch and noise and takes its own slice, so N processes
train exactly what one process would with N times the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch

from lora_offset.config import Config, load_config
from lora_offset.errors import UserError
from lora_offset.fileio import atomic_path
from lora_offset.formats import kohya
from lora_offset.training import models, networks, noise
from lora_offset.training.data.captions import check_caption_lengths
from lora_offset.training.data.dataset import build_dataset
from lora_offset.training.data.scan import missing_class_images

log = logging.getLogger("lora_offset")

OPTIMIZER_CLASSES = {"adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit", "adamw": "torch.optim.adamw.AdamW"}
STATE_DIR = "state"
STATE_PREFIX = "state-"
KEEP_STATES = 2


class TrainingInterrupted(Exception):
    """Ctrl-C: a resumable state and the current adapter were saved."""


def train(config: Config, resume: str | None = None, base: "models.BaseModel | None" = None,
          hooks=None) -> Path:
    """Train and export. `base` replaces loading config.model (benchmarks pass random-init SD 1.5);
    `hooks` (optional) gets `on_step_start(step)` and `on_step_end(step, loss)` around each optimizer step."""
    t, net, noise_cfg = config.training, config.network, config.noise
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    # ---- accelerate: devices, processes, mixed precision, gradient accumulation -------------
    mixed_precision = t.mixed_precision
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        log.warning("training.mixed_precision = \"fp16\" needs a CUDA GPU; training in fp32 on this machine")
        mixed_precision = "no"
    output_dir = Path(t.output_dir)
    logging_dir = Path(t.logging_dir) if t.logging_dir else output_dir / "logs"
    # On a machine without CUDA, processes started by `accelerate launch --multi_gpu` (torchrun) must be
    # told they are CPU processes, or accelerate treats each one as a separate single-process run.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
    )
    is_main = accelerator.is_main_process
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- cheap checks first: a typo must not cost a model load ------------------------------
    if is_main:
        check_output_dir(output_dir, needed_bytes=estimate_adapter_bytes(net))
    resume_file = find_resume_state(resume, output_dir) if resume else None
    world = accelerator.num_processes
    global_batch_cfg = dataclasses.replace(config.dataset, batch_size=config.dataset.batch_size * world)
    dataset = build_dataset(global_batch_cfg, seed=t.seed)  # UserError if no readable instance image

    # ---- base model, frozen, in half precision on GPU -------------------------------------
    if base is None:
        base = models.load_base_model(config.model, dtype=weight_dtype)
    else:
        for module in (base.unet, base.vae, base.text_encoder):
            module.requires_grad_(False).to(weight_dtype)
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoder, base.tokenizer
    scheduler = noise.training_scheduler(base.scheduler_config, zero_terminal_snr=noise_cfg.zero_terminal_snr,
                                         prediction_type=config.model.prediction_type)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    num_train_timesteps = scheduler.config.num_train_timesteps
    # The UNet joins the GPU only after the caches are built and the encoders have left: the
    # VAE's encode activations and the UNet's weights are never there at the same time.
    vae.to(device)
    text_encoder.to(device)

    # Prior preservation: generate the class images that are missing, with the untouched base model.
    if generate_class_images(config, base, device):
        dataset = build_dataset(global_batch_cfg, seed=t.seed)
    check_caption_lengths(dataset.captions, tokenizer)

    # ---- LoRA (fp32 weights) ----------------------------------------------------------------
    from accelerate.utils import set_seed

    set_seed(t.seed)  # LoRA init draws from the global RNG: same seed, same starting adapter
    unet_params = networks.add_lora(unet, networks.unet_lora_config(net.rank, net.alpha, net.conv_rank, net.conv_alpha, net.dropout))
    te_params = []
    if net.train_text_encoder:
        te_params = networks.add_lora(text_encoder, networks.text_encoder_lora_config(net.rank, net.alpha, net.dropout))
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if net.train_text_encoder:
            text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    unet.train()
    text_encoder.train(net.train_text_encoder)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.allow_tf32 = t.allow_tf32

    # ---- caches: latents and (frozen encoder) text embeddings, then move the encoders off the GPU
    if t.cache_latents:
        cache_dir = output_dir / "latent_cache" if t.cache_latents_to_disk else None
        # encoder_id: a disk cache made with another base model or VAE is never reused.
        dataset.cache_latents(lambda px: encode_images(vae, px, weight_dtype), cache_dir=cache_dir,
                              encoder_id=f"{config.model.pretrained}|{config.model.vae}|{weight_dtype}")
        vae.to("cpu")
    text_cache = None
    if t.cache_text_embeddings and not net.train_text_encoder and dataset.caption_set() is not None:
        with torch.no_grad():
            text_cache = {c: encode_prompts(tokenizer, text_encoder, [c])[0].cpu() for c in dataset.caption_set()}
        text_encoder.to("cpu")
    unet.to(device)
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)

    # ---- optimizer and learning-rate schedule -----------------------------------------------
    groups = [{"params": unet_params, "lr": t.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": t.learning_rate if t.text_encoder_lr is None else t.text_encoder_lr})
    optimizer = make_optimizer(t.optimizer, groups, t.weight_decay)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps)
    if net.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    forward_unet = torch.compile(unet) if t.torch_compile else unet
    trainable = unet_params + te_params

    # ---- resume: adapter weights, optimizer, schedule, RNG, step -----------------------------
    generator = torch.Generator(device="cpu").manual_seed(t.seed + 1)  # noise, timesteps: independent of data order
    step = 0
    started_at = time.time()
    if resume_file is not None:
        step, started_at = load_state(resume_file, unet, text_encoder, optimizer, lr_scheduler, generator, accelerator)
        log.info("resumed from %s at step %d", resume_file, step)

    if is_main:
        accelerator.init_trackers("lora-offset", config=flat_hparams(config))
    stop = install_sigint_handler()
    nonfinite_in_a_row = 0
    skipped_steps = 0

    from tqdm.auto import tqdm

    progress = tqdm(total=t.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    # ---- the loop -----------------------------------------------------------------------------
    while step < t.max_steps:
        if hooks is not None:
            hooks.on_step_start(step)
        loss_sum = 0.0
        for micro in range(t.gradient_accumulation_steps):
            batch = dataset.batch(step * t.gradient_accumulation_steps + micro)
            with accelerator.accumulate(unet):
                # Latents of the whole global batch (cached, or encoded now), in fp32 for the noise math.
                if batch.latents is not None:
                    latents = batch.latents.to(device, torch.float32)
                else:
                    latents = encode_images(vae, batch.pixel_values.to(device), weight_dtype).float()
                n = latents.shape[0]
                # Noise and timesteps for the whole global batch, then this process's slice.
                eps = noise.sample_noise(latents, noise_cfg, generator).to(device)
                timesteps = noise.sample_timesteps(n, num_train_timesteps, generator).to(device)
                noisy_eps = eps
                if noise_cfg.input_perturbation > 0:
                    noisy_eps = noise.perturb_noise(eps, noise_cfg.input_perturbation, generator).to(device)
                mine = process_slice(batch.is_reg, accelerator.process_index, world)
                latents, eps, noisy_eps, timesteps = latents[mine], eps[mine], noisy_eps[mine], timesteps[mine]
                is_reg = batch.is_reg[mine].to(device)
                captions = [batch.captions[i] for i in mine.tolist()]

                noisy_latents = noise.add_noise(latents, noisy_eps, timesteps, alphas_cumprod)
                target = noise.training_target(latents, eps, timesteps, alphas_cumprod, config.model.prediction_type)
                if text_cache is not None:
                    cond = torch.stack([text_cache[c] for c in captions]).to(device, weight_dtype)
                else:
                    cond = encode_prompts(tokenizer, text_encoder, captions)
                with accelerator.autocast():
                    pred = forward_unet(noisy_latents.to(weight_dtype), timesteps, cond).sample
                loss = dreambooth_loss(
                    noise.per_sample_loss(pred.float(), target.float()), is_reg, t.prior_loss_weight,
                    weights=min_snr(noise_cfg, alphas_cumprod, timesteps, config.model.prediction_type),
                )
                if not finite_everywhere(accelerator, loss):
                    # Skipping keeps a NaN out of the weights; the optimizer sees no update. Every
                    # process skips together, or the others would wait forever in backward's all-reduce.
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum = float("nan")
                    break
                accelerator.backward(loss)
                loss_sum += loss.detach().item() / t.gradient_accumulation_steps
                if accelerator.sync_gradients:
                    grad_norm = grad_total_norm(trainable)
                    if not math.isfinite(grad_norm) and accelerator.scaler is None:
                        optimizer.zero_grad(set_to_none=True)
                        loss_sum = float("nan")
                        break
                    if t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        stepped = math.isfinite(loss_sum)
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
        if not stepped:
            continue
        if hooks is not None:
            hooks.on_step_end(step, loss_sum)

        # ---- logs, samples, saves (main process writes; everyone waits) --------------------
        lr = lr_scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
        accelerator.log({"loss": loss_sum, "lr": lr, "skipped_steps": skipped_steps}, step=step)
        if t.sample_every_steps and step % t.sample_every_steps == 0:
            accelerator.wait_for_everyone()
            if is_main:
                write_samples(config, accelerator, base, unet, text_encoder, step, device)
        if stop.requested or (t.save_state_every_steps and step % t.save_state_every_steps == 0 and step < t.max_steps):
            accelerator.wait_for_everyone()
            if is_main:
                save_state(output_dir, step, started_at, unet, text_encoder, optimizer, lr_scheduler, generator, accelerator)
        if t.save_every_steps and step % t.save_every_steps == 0 and step < t.max_steps or stop.requested:
            accelerator.wait_for_everyone()
            if is_main:
                suffix = "" if stop.requested else f"-step{step:06d}"
                save_adapter(config, dataset, accelerator, unet, text_encoder, step, started_at,
                             output_dir / f"{t.output_name}{suffix}.safetensors")
        if stop.requested:
            progress.close()
            accelerator.end_training()
            raise TrainingInterrupted(
                f"interrupted at step {step}: state saved in {output_dir / STATE_DIR}; continue with\n"
                f"  lora-offset train --config <your config> --resume latest"
            )

    progress.close()
    # ---- export ---------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    adapter_path = config.adapter_path
    if is_main:
        save_adapter(config, dataset, accelerator, unet, text_encoder, step, started_at, adapter_path)
        log.info("saved %s", adapter_path)
    accelerator.end_training()
    stop.restore()
    return adapter_path


# ---------------------------------------------------------------------------------------------------
# The pieces the loop calls, in the order it calls them.


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


def generate_class_images(config: Config, base, device) -> bool:
    """Fill regularization folders up to num_class_images with the base model's images of class_tokens."""
    missing = [(s, missing_class_images(s)) for s in config.dataset.subsets if s.is_reg and s.num_class_images]
    missing = [(s, k) for s, k in missing if k > 0]
    if not missing:
        return False
    from lora_offset import sample

    unet_device = base.unet.device
    base.unet.to(device)
    pipe = sample.build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler_config,
                                 prediction_type="epsilon")
    size = config.dataset.resolution
    for subset, count in missing:
        log.info("generating %d class images for %r in %s", count, subset.class_tokens, subset.image_dir)
        seeds = [config.training.seed * 100_000 + i for i in range(count)]
        images = sample.generate(pipe, [subset.class_tokens] * count, seeds, steps=config.training.sample_steps,
                                 guidance_scale=config.training.sample_guidance_scale, height=size, width=size)
        folder = Path(subset.image_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(seeds, images):
            with atomic_path(folder / f"class-{seed}.png") as tmp:
                image.save(tmp, format="PNG")
    base.unet.to(unet_device)
    return True


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The distribution's mean, not a sample: cached and uncached latents must agree exactly (resume).
    latents = vae.encode(pixel_values.to(vae.device, dtype)).latent_dist.mean
    return latents * vae.config.scaling_factor


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def make_optimizer(name: str, groups: list[dict], weight_decay: float):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    # fused: one kernel for the whole update on CUDA (LoRA weights are fp32, which it requires)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=on_cuda or None)


def process_slice(is_reg: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Indices of this process's share of a global batch: an equal part of the instance and of the class samples."""
    inst = torch.nonzero(~is_reg).flatten()
    reg = torch.nonzero(is_reg).flatten()
    parts = [inst.chunk(world)[rank] if len(inst) >= world else inst, reg.chunk(world)[rank] if len(reg) >= world else reg]
    return torch.cat(parts)


def min_snr(noise_cfg, alphas_cumprod, timesteps, prediction_type):
    if noise_cfg.min_snr_gamma <= 0:
        return None
    return noise.min_snr_weights(noise.snr(alphas_cumprod, timesteps), noise_cfg.min_snr_gamma, prediction_type)


def dreambooth_loss(per_sample: torch.Tensor, is_reg: torch.Tensor, prior_loss_weight: float,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE(instance) + prior_loss_weight * MSE(class), each the mean over its samples."""
    if weights is not None:
        per_sample = per_sample * weights
    loss = per_sample[~is_reg].mean()
    if is_reg.any():
        loss = loss + prior_loss_weight * per_sample[is_reg].mean()
    return loss


def finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite in every process (one all-reduce under multi-process training)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def grad_total_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return torch.stack(grads).norm().item()


class _StopFlag:
    def __init__(self):
        self.requested = False
        self._previous = None

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def install_sigint_handler() -> _StopFlag:
    """Ctrl-C finishes the current step, then saves a resumable state and the adapter (a second Ctrl-C aborts)."""
    flag = _StopFlag()
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread
        return flag

    def handler(signum, frame):
        if flag.requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag.requested = True
        log.warning("Ctrl-C: finishing this step, then saving (press again to abort without saving)")

    try:
        signal.signal(signal.SIGINT, handler)
        flag._previous = previous
    except ValueError:
        pass
    return flag


def write_samples(config: Config, accelerator, base, unet, text_encoder, step: int, device) -> None:
    from lora_offset import sample

    t = config.training
    vae_device = base.vae.device
    te_device = text_encoder.device
    base.vae.to(device)
    text_encoder.to(device)
    was_training = unet.training
    unet_model = accelerator.unwrap_model(unet)
    te_model = accelerator.unwrap_model(text_encoder)
    unet_model.eval()
    te_model.eval()
    pipe = sample.build_pipeline(unet_model, base.vae, te_model, base.tokenizer, base.scheduler_config,
                                 prediction_type=config.model.prediction_type,
                                 zero_terminal_snr=config.noise.zero_terminal_snr)
    seeds = [t.seed + i for i in range(len(t.sample_prompts))]
    size = config.dataset.resolution
    images = sample.generate(pipe, t.sample_prompts, seeds, steps=t.sample_steps,
                             guidance_scale=t.sample_guidance_scale, height=size, width=size)
    sample.save_samples(images, Path(t.output_dir) / "samples", step, t.sample_prompts)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    if tracker is not None:
        import numpy as np

        for i, image in enumerate(images):
            tracker.add_image(f"sample/{i}", np.asarray(image), global_step=step, dataformats="HWC")
    unet_model.train(was_training)
    te_model.train(config.network.train_text_encoder)
    base.vae.to(vae_device)
    text_encoder.to(te_device)


def save_adapter(config: Config, dataset, accelerator, unet, text_encoder, step: int, started_at: float,
                 path: Path) -> Path:
    t, net, z = config.training, config.network, config.noise
    unet_model = accelerator.unwrap_model(unet)
    te_model = accelerator.unwrap_model(text_encoder) if net.train_text_encoder else None
    state = kohya.kohya_state_dict(unet_model, te_model)
    metadata = kohya.ss_metadata(
        output_name=t.output_name,
        network_dim=net.rank,
        network_alpha=net.alpha,
        conv_dim=net.conv_rank,
        conv_alpha=net.conv_alpha,
        train_text_encoder=net.train_text_encoder,
        steps=step,
        epoch=step // max(1, dataset.steps_per_epoch),
        resolution=config.dataset.resolution,
        learning_rate=t.learning_rate,
        unet_lr=t.learning_rate,
        text_encoder_lr=t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate,
        optimizer=OPTIMIZER_CLASSES[t.optimizer],
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
    )
    return kohya.save_lora(path, state, metadata, precision=t.save_precision)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def save_state(output_dir: Path, step: int, started_at: float, unet, text_encoder, optimizer, lr_scheduler,
               generator, accelerator) -> Path:
    """Everything needed to continue bit-identically: LoRA weights, optimizer, schedule, RNG, step."""
    state = {
        "step": step,
        "started_at": started_at,
        "unet_lora": lora_state(accelerator.unwrap_model(unet)),
        "text_encoder_lora": lora_state(accelerator.unwrap_model(text_encoder)),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": list(random.getstate()[1]),
    }
    folder = output_dir / STATE_DIR
    path = folder / f"{STATE_PREFIX}{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(folder.glob(f"{STATE_PREFIX}*.pt"))[:-KEEP_STATES]:
        old.unlink(missing_ok=True)
    return path


def find_resume_state(resume: str, output_dir: Path) -> Path:
    """`latest` (newest state in output_dir), a state folder, an output folder, or a state file."""
    candidates = {"latest": output_dir / STATE_DIR}.get(resume, Path(resume))
    if candidates.is_dir():
        folder = candidates / STATE_DIR if (candidates / STATE_DIR).is_dir() else candidates
        states = sorted(folder.glob(f"{STATE_PREFIX}*.pt"))
        if not states:
            raise UserError(f"--resume {resume}: no saved training state in {folder} "
                            f"(states are written every training.save_state_every_steps steps)")
        return states[-1]
    if candidates.is_file():
        return candidates
    raise UserError(f"--resume {resume}: {candidates} does not exist")


def load_state(path: Path, unet, text_encoder, optimizer, lr_scheduler, generator, accelerator) -> tuple[int, float]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which
        raise UserError(f"--resume: {path} is not a readable lora-offset training state ({type(e).__name__})") from None
    for key, model in (("unet_lora", unet), ("text_encoder_lora", text_encoder)):
        params = dict(accelerator.unwrap_model(model).named_parameters())
        saved = state[key]
        current = {n for n in params if "lora_" in n}
        if set(saved) != current:
            raise UserError(f"--resume: {path} was saved with a different network (rank, conv or text encoder "
                            "settings differ from this config)")
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    return int(state["step"]), float(state["started_at"])


def flat_hparams(config: Config) -> dict:
    flat = {}
    for section, values in config.to_dict().items():
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
    try:
        path = train(config, resume=args.resume)
    except TrainingInterrupted as e:
        log.warning("%s", e)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch, only the main process reports
        print(f"saved {path}")
    return 0
