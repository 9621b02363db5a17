"""Images made during training: the missing class images (before), sample images (during), and the
pipeline that samples and the range monitor (monitor.py) share."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

from lora_offset.config import Config
from lora_offset.errors import UserError
from lora_offset.fileio import atomic_path
from lora_offset.training.data.buckets import resolution_size
from lora_offset.training.data.scan import missing_class_images
from lora_offset.training.trackers import log_images

log = logging.getLogger("lora_offset")


def generate_class_images(config: Config, base, device) -> bool:
    """Fill regularization folders up to num_class_images with the base model's images of class_tokens."""
    missing = [(s, missing_class_images(s), resolution_size(d.resolution)) for d in config.datasets
               for s in d.subsets if s.is_reg and s.num_class_images]
    missing = [(s, k, size) for s, k, size in missing if k > 0]
    if not missing:
        return False
    from lora_offset.experiments import sample

    unet_device = base.unet.device
    base.unet.to(device)
    pipe = sample.build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler_config,
                                 prediction_type="epsilon")
    for subset, count, (width, height) in missing:
        log.info("generating %d class images for %r in %s", count, subset.class_tokens, subset.image_dir)
        seeds = [config.training.seed * 100_000 + i for i in range(count)]
        images = sample.generate(pipe, [subset.class_tokens] * count, seeds, steps=config.training.sample_steps,
                                 guidance_scale=config.training.sample_guidance_scale, height=height, width=width,
                                 clip_skip=config.training.clip_skip,
                                 max_token_length=config.training.max_token_length)
        folder = Path(subset.image_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(seeds, images):
            with atomic_path(folder / f"class-{seed}.png") as tmp:
                image.save(tmp, format="PNG")
    base.unet.to(unet_device)
    return True


def sample_prompts(config: Config) -> list:
    """The sample prompts with every setting filled in (`training.sample_*`, `dataset.resolution`).

    A prompt file is read again at each sampling, as kohya does, so it can be edited during training.
    """
    from lora_offset.formats.sample_prompts import prompts_from_config, resolve

    t, (width, height) = config.training, resolution_size(config.dataset.resolution)
    return resolve(prompts_from_config(t.sample_prompts, "config"), width=width, height=height, seed=t.seed,
                   steps=t.sample_steps, guidance_scale=t.sample_guidance_scale, sampler=t.sample_sampler)


@contextlib.contextmanager
def sampling_pipeline(config: Config, accelerator, base, unet, text_encoder, device) -> Iterator:
    """A pipeline around the training models (eval mode, VAE and text encoder on `device`) for the block:
    samples and the range monitor share it. Devices and training modes are restored after."""
    from lora_offset.experiments import sample

    vae_device, te_device = base.vae.device, text_encoder.device
    base.vae.to(device)
    text_encoder.to(device)
    was_training = unet.training
    unet_model, te_model = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    unet_model.eval()
    te_model.eval()
    try:
        yield sample.build_pipeline(unet_model, base.vae, te_model, base.tokenizer, base.scheduler_config,
                                    prediction_type=config.model.prediction_type,
                                    zero_terminal_snr=config.noise.zero_terminal_snr)
    finally:
        unet_model.train(was_training)
        te_model.train(config.network.train_text_encoder)
        base.vae.to(vae_device)
        text_encoder.to(te_device)


def write_samples(config: Config, accelerator, pipe, scheduler_config, step: int) -> None:
    """The sample prompts' images from `pipe` (sampling_pipeline) into samples/ and the trackers."""
    from lora_offset.experiments import sample

    t = config.training
    try:
        prompts = sample_prompts(config)
    except UserError as e:  # the prompt file was edited into an error during training: train on
        log.warning("no sample images at step %d: %s", step, e)
        return
    images = []
    for p in prompts:  # each prompt its own size, seed, steps, guidance, negative prompt and sampler
        pipe.scheduler = sample.sampling_scheduler(scheduler_config, p.sampler,
                                                   prediction_type=config.model.prediction_type,
                                                   zero_terminal_snr=config.noise.zero_terminal_snr)
        images += sample.generate(pipe, [p.prompt], [p.seed], steps=p.steps, guidance_scale=p.guidance_scale,
                                  height=p.height, width=p.width, negative_prompt=p.negative_prompt,
                                  clip_skip=t.clip_skip, max_token_length=t.max_token_length)
    sample.save_samples(images, Path(t.output_dir) / "samples", step, [p.prompt for p in prompts])
    log_images(accelerator, images, step)
