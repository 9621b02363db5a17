"""Tiny Stable Diffusion 1.x-topology models, built in code: no download, no weights on disk.

The UNet has SD 1.5's block types, layers_per_block=2 and attention layout, so every LoRA target's
name (and so every LoRA key, LDM key and merge) matches SD 1.5; only the widths are narrow. One
non-target module differs: with widths 64 -> 64, down_blocks.2.resnets.0 needs no conv_shortcut.
The text encoder has CLIP ViT-L/14's 12 layers at width 32, so the text encoder has the same 72
LoRA target modules as SD 1.5. The tokenizer is character-level over CLIP's byte alphabet.
Used by the tests and by anyone who wants to try the trainer offline on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_offset.formats.clip_tokenizer import bytes_to_unicode

# SD 1.5's scheduler (the training schedule every SD 1.x LoRA is trained under).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "skip_prk_steps": True,
}

TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

TINY_TEXT_ENCODER_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = {(a, b) for a, b in zip(pieces, pieces[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def word_merges(words) -> list[tuple[str, str]]:
    """BPE merges under which each given lowercase ASCII word is one token ("dark" -> "dark</w>").

    Each word's pieces are joined left to right; where another word's merges split it differently
    first, merges of the pieces it does reach are added until it comes out whole."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add(pair):
        if pair not in ranks:
            ranks[pair] = len(merges)
            merges.append(pair)

    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            add((left, right))
            left = left + right
    for word in words:
        while len(pieces := _bpe(word, ranks)) > 1:
            add((pieces[0], pieces[1]))
    return merges


def write_tiny_tokenizer(folder: str | Path, vocab_size: int | None = None, words=()) -> Path:
    """Write a character-level CLIP tokenizer (vocab.json, merges.txt) into `folder`.

    `vocab_size` (e.g. CLIP ViT-L/14's 49408) pads the vocabulary with unused tokens so that the
    special tokens get that model's ids (start = vocab_size - 2, end = vocab_size - 1).
    `words`: whole words that become single tokens (BPE merges build them); any other text is
    still split into characters, as a rare word is in CLIP's real vocabulary.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = word_merges(words)
    tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in set(tokens)))
    if vocab_size is not None:
        tokens += [f"<|unused-{i}|>" for i in range(vocab_size - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def tiny_vocab_size(words=()) -> int:
    """Vocabulary size of `write_tiny_tokenizer(folder, words=words)`."""
    chars = set(bytes_to_unicode().values())
    built = {a + b for a, b in word_merges(words)} - chars - {c + "</w>" for c in chars}
    return 2 * 256 + len(built) + 2


def build_tiny_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """Return {unet, vae, text_encoder, tokenizer, scheduler} of a tiny SD 1.x model (random init)."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_config = CLIPTextConfig(
        vocab_size=tiny_vocab_size(),
        bos_token_id=tiny_vocab_size() - 2,
        eos_token_id=tiny_vocab_size() - 1,
        pad_token_id=tiny_vocab_size() - 1,
        **TINY_TEXT_ENCODER_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config)
    if tokenizer_dir is None:
        # The tokenizer reads its files into memory: a folder that disappears afterwards is enough.
        with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as folder:
            tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(folder)))
    else:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tokenizer_dir)))
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD 1.x model as a diffusers folder (what `model.pretrained` accepts)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    components = build_tiny_components(seed=seed, tokenizer_dir=folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
