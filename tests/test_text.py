"""Caption encoding: clip skip and 75/150/225-token captions, against the text encoder run by hand."""

from __future__ import annotations

import pytest
import torch

from lora_offset.training.text import encode_prompts, tokenize


@pytest.fixture(scope="module")
def clip():
    from lora_offset.tiny import build_tiny_components

    parts = build_tiny_components(seed=0)
    parts["text_encoder"].eval()
    return parts["tokenizer"], parts["text_encoder"]


def caption_of(tokenizer, n_tokens: int) -> str:
    """A tag list of exactly n_tokens tokens (BOS/EOS not counted)."""
    words = []
    while len(tokenizer(", ".join(words), add_special_tokens=False, verbose=False).input_ids) < n_tokens:
        words.append(f"tag{len(words)}")
    caption = ", ".join(words)
    ids = tokenizer(caption, add_special_tokens=False, verbose=False).input_ids[:n_tokens]
    caption = tokenizer.decode(ids)
    assert len(tokenizer(caption, add_special_tokens=False, verbose=False).input_ids) == n_tokens
    return caption


def test_75_tokens_is_the_tokenizers_own_77_token_encoding(clip):
    tok, te = clip
    prompts = ["a photo of sks dog", "", caption_of(tok, 75), caption_of(tok, 120)]
    ours = tokenize(tok, prompts, 75)
    theirs = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours.shape == (4, 1, 77) and torch.equal(ours[:, 0], theirs)
    with torch.no_grad():
        assert torch.equal(encode_prompts(tok, te, prompts), te(theirs)[0])


def test_clip_skip_2_is_the_penultimate_hidden_state_after_the_final_layer_norm(clip):
    tok, te = clip
    prompts = ["a photo of sks dog", "red, blue"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        penultimate = te.final_layer_norm(out.hidden_states[-2])
        assert len(out.hidden_states) == te.config.num_hidden_layers + 1  # embeddings, then every layer
        assert torch.equal(encode_prompts(tok, te, prompts, clip_skip=2), penultimate)
        assert torch.equal(encode_prompts(tok, te, prompts, clip_skip=1), out.last_hidden_state)
        assert not torch.allclose(penultimate, out.last_hidden_state)
        third = te.final_layer_norm(out.hidden_states[-3])
        assert torch.equal(encode_prompts(tok, te, prompts, clip_skip=3), third)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_225_tokens_are_three_77_token_encodings_joined_as_kohya_does(clip, clip_skip):
    """Each 75-token chunk is encoded alone as <BOS> chunk <EOS> <pad>...; kohya joins the first chunk's
    BOS state, each chunk's 75 token states and the last chunk's final state: 227 states."""
    tok, te = clip
    caption = caption_of(tok, 150)  # the third chunk is empty: <BOS> <EOS> <pad>...
    tokens = tok(caption, add_special_tokens=False).input_ids
    chunks = []
    for k in range(3):
        part = tokens[75 * k:75 * (k + 1)]
        ids = [tok.bos_token_id] + part + [tok.eos_token_id]
        ids += [tok.pad_token_id] * (77 - len(ids))
        chunks.append(torch.tensor([ids]))
    with torch.no_grad():
        states = []
        for ids in chunks:  # three separate 77-token passes
            out = te(ids, output_hidden_states=True)
            states.append(out.last_hidden_state if clip_skip == 1 else te.final_layer_norm(out.hidden_states[-2]))
        expected = torch.cat([states[0][:, :1]] + [s[:, 1:76] for s in states] + [states[2][:, -1:]], dim=1)
        ours = encode_prompts(tok, te, [caption], clip_skip=clip_skip, max_token_length=225)
    assert ours.shape == (1, 227, te.config.hidden_size)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(tokenize(tok, [caption], 225)[0], torch.cat(chunks))


def test_long_captions_are_cut_at_max_token_length(clip):
    tok, te = clip
    long = caption_of(tok, 260)
    ids = tokenize(tok, [long, "dog"], 150)
    assert ids.shape == (2, 2, 77)
    content = tok(long, add_special_tokens=False).input_ids
    assert ids[0, 1, 1:76].tolist() == content[75:150]  # token 151 and later are cut
    assert ids[0, 1, 76].item() == tok.eos_token_id
    assert ids[1, 1, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]  # an empty chunk
    with torch.no_grad():
        assert encode_prompts(tok, te, [long, "dog"], max_token_length=150).shape == (2, 152, 32)
    with pytest.raises(ValueError, match="max_token_length"):
        tokenize(tok, ["dog"], 100)


def test_sampling_encodes_prompts_the_way_training_did(clip):
    from lora_offset.experiments.sample import _prompt_inputs

    tok, te = clip
    pipe = type("Pipe", (), {"tokenizer": tok, "text_encoder": te})()
    assert _prompt_inputs(pipe, ["dog"], [""], 1, 75) == {"prompt": ["dog"], "negative_prompt": [""]}
    with torch.no_grad():
        inputs = _prompt_inputs(pipe, ["dog", "cat"], ["blurry", ""], 2, 225)
        # one batch of four there, two batches of two here: equal up to float reduction order
        torch.testing.assert_close(inputs["prompt_embeds"], encode_prompts(tok, te, ["dog", "cat"], 2, 225))
        torch.testing.assert_close(inputs["negative_prompt_embeds"], encode_prompts(tok, te, ["blurry", ""], 2, 225))
