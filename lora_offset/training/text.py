"""Captions -> text-encoder hidden states (the UNet's cross-attention input)."""

from __future__ import annotations

import torch


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]
