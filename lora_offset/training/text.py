"""Captions -> text-encoder hidden states (the UNet's cross-attention input): clip skip and long captions.

clip_skip (kohya, A1111): 1 = CLIP's last layer (its `last_hidden_state`); N = the hidden state N
layers from the end, then CLIP's final layer norm, as kohya's SdTextEncodingStrategy and A1111 do.
NAI-derived (anime) SD 1.x models are trained with clip skip 2.

max_token_length (75 | 150 | 225 tokens of caption): the caption is cut into 75-token chunks, each
encoded on its own as a 77-token sequence `<BOS> chunk <EOS> <pad>...`; the hidden states are joined
as kohya does: the first chunk's BOS state, each chunk's 75 token states, the last chunk's final state,
75 n + 2 states in all (227 for 225). With 75 this is exactly CLIP's usual 77-token encoding.
(A1111 keeps every chunk's BOS and EOS states, 77 n; the UNet's cross-attention takes either length.)
"""

from __future__ import annotations

import torch

CHUNK = 75  # caption tokens per CLIP pass (77 minus BOS and EOS)
MAX_TOKEN_LENGTHS = (75, 150, 225)


def tokenize(tokenizer, prompts: list[str], max_token_length: int = CHUNK) -> torch.Tensor:
    """Token ids (B, n, 77) for n = max_token_length / 75 chunks (see the module docstring)."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, got {max_token_length}")
    chunks = max_token_length // CHUNK
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    out = torch.full((len(ids), chunks, CHUNK + 2), pad, dtype=torch.long)
    for i, tokens in enumerate(ids):
        tokens = tokens[:max_token_length]
        for k in range(chunks):
            part = tokens[k * CHUNK:(k + 1) * CHUNK]
            row = [bos] + part + [eos]
            out[i, k, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def encode_tokens(text_encoder, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states (B, 75 n + 2, D) of token ids (B, n, 77) (see the module docstring)."""
    batch, chunks, length = ids.shape
    flat = ids.reshape(batch * chunks, length).to(text_encoder.device)
    if clip_skip == 1:
        states = text_encoder(flat)[0]
    else:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states
        if clip_skip > len(hidden) - 1:
            raise ValueError(f"clip_skip {clip_skip} is more than the text encoder's {len(hidden) - 1} layers")
        states = _final_layer_norm(text_encoder)(hidden[-clip_skip])
    states = states.reshape(batch, chunks * length, states.shape[-1])
    if chunks == 1:
        return states
    parts = [states[:, :1]] + [states[:, k * length + 1:k * length + 1 + CHUNK] for k in range(chunks)]
    return torch.cat(parts + [states[:, -1:]], dim=1)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int = 1,
                   max_token_length: int = CHUNK) -> torch.Tensor:
    return encode_tokens(text_encoder, tokenize(tokenizer, prompts, max_token_length), clip_skip)


def num_layers(text_encoder) -> int:
    return _module(text_encoder).config.num_hidden_layers


def _module(text_encoder):
    return getattr(text_encoder, "module", text_encoder)  # under DistributedDataParallel


def _final_layer_norm(text_encoder):
    model = _module(text_encoder)
    # transformers 5's CLIPTextModel holds it directly; 4.x under .text_model
    return getattr(model, "text_model", model).final_layer_norm
