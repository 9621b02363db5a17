"""The CLIP ViT-L/14 tokenizer built offline equals OpenAI's own CLIP tokenizer, token for token.

The reference is OpenAI's `SimpleTokenizer` (clip/simple_tokenizer.py of the openai-clip package),
loaded from its file: the `clip` package's `__init__` imports torchvision, which lora-offset does not install.
"""

import importlib.util
import random
import sys

import pytest

from lora_offset.formats import clip_tokenizer
from lora_offset.errors import UserError


@pytest.fixture(scope="module")
def reference():
    """OpenAI's tokenizer module (simple_tokenizer.py run on its own)."""
    bpe = clip_tokenizer.find_clip_bpe_file()
    assert bpe is not None, f"openai-clip is a dependency: {clip_tokenizer.CLIP_INSTALL}"
    assert bpe.parent.name == "clip", f"the reference is OpenAI's package, found {bpe}"
    spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", bpe.parent / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip(reference):
    return reference.SimpleTokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer.build_clip_tokenizer()


def ids(tokenizer, text):
    """Token ids without <|startoftext|>/<|endoftext|> and without truncation."""
    out = tokenizer(text, truncation=False).input_ids
    assert out[0] == 49406 and out[-1] == 49407
    return out[1:-1]


def clip_tokenize(clip, text: str, context_length: int = 77) -> list[int]:
    """OpenAI's clip.tokenize(text, truncate=True) for one text (clip/clip.py, which needs torchvision to
    import): <|startoftext|> + tokens + <|endoftext|>, cut to 77 with <|endoftext|> kept last, zero-padded."""
    sot, eot = clip.encoder["<|startoftext|>"], clip.encoder["<|endoftext|>"]
    tokens = [sot] + clip.encode(text) + [eot]
    if len(tokens) > context_length:
        tokens = tokens[:context_length]
        tokens[-1] = eot
    return tokens + [0] * (context_length - len(tokens))


TAGS = ("masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, open mouth, blue eyes, "
        "blonde hair, shirt, hair ornament, long sleeves, dress, holding, standing, full body, flower, outdoors, "
        "sky, day, cloud, white dress, tree, blue sky, grass, sunlight, (detailed background:1.2), [lowres], "
        "<lora:my_style:0.8>, score_9, score_8_up, rating:safe, 8k uhd, f/1.8, 35mm, 2024-05-17")

# Texts that CLIP's text cleaning (ftfy.fix_text, html.unescape) leaves as they are.
CORPUS = [
    "a photo of sks dog",
    "A PHOTO OF SKS DOG",
    "",
    "   ",
    "hello   world\t\t\nand\r\nnew lines   ",
    "Café crème brûlée, naïve façade, jalapeño, Ångström, smörgåsbord, Zürich, São Paulo, Kraków",
    "Ünïcödé: ΑΒΓ δέλτα, Москва, 東京タワー, 日本語の文章, 中文字符, 한국어 문장, ไทย, العربية, עברית, हिन्दी",
    "emoji 😀🎉👍🏽❤️🇯🇵 👨‍👩‍👧 ✨🔥 in a row😀😀😀",
    "punctuation!!! ??? ... --- ;;; ::: () [] {} <> @#$%^&*_+=|\\/~` 'quote' \"double\" ,,,",
    "it's don't we're they've I'm you'll he'd IT'S",
    "numbers 0 1 12 123 3.14159 1,000,000 -42 +7 1e-5 2024-05-17 12:30 50% #1 v1.5",
    "1girl, 2boys, 3d, 4k, 8k, 16:9",
    TAGS,
    ", ".join([TAGS] * 3),  # ~300 tokens: far past 77
    "sks" * 40,  # one long word: many merges
    "a" * 300,
    "(masterpiece:1.3), ((best quality)), [[worst]], {{blue}}, photo_of_sks_dog, BREAK, AND",
    "mixed ΑΒΓ and abc and 123 and 😀 and é in one",
    "tab\tseparated\tvalues and NBSP\u00a0inside, thin\u2009space",
    "ß ẞ ℌ ℹ Ⅻ ①②③ ¹²³ ½ ¼ ™ © ®",
]


def test_vocabulary_and_merges_are_clips(clip, tokenizer):
    vocab = tokenizer.get_vocab()
    assert len(vocab) == len(tokenizer) == clip_tokenizer.VOCAB_SIZE == 49408
    assert vocab == clip.encoder
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)
    _, merges = clip_tokenizer.clip_vocab_and_merges(
        clip_tokenizer.read_clip_bpe_text(clip_tokenizer.find_clip_bpe_file()))
    assert merges == sorted(clip.bpe_ranks, key=clip.bpe_ranks.get)
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert "clip" not in sys.modules  # located on disk, never imported (its __init__ needs torchvision)


@pytest.mark.parametrize("text", CORPUS)
def test_same_tokens_as_clip(clip, reference, tokenizer, text):
    # the corpus is text that CLIP's cleaning keeps (up to whitespace, which both collapse)
    assert reference.basic_clean(text).split() == text.split()
    assert ids(tokenizer, text) == clip.encode(text)


def random_texts(count, seed=0):
    """Seeded random strings over ASCII, accents, scripts, emoji, unicode spaces and symbols."""
    pool = ([chr(c) for c in range(0x20, 0x7F)] + list("éèêëàâäçñøåæœßüöïîôûÉÈÀÇÑ")
            + list("αβγδΩЖжЯя日本語中文한국어ไทยعربيעברית") + ["😀", "🎉", "👍🏽", "❤️", "🇯🇵", "\u200d"]
            + list(" \t\n  ") + list("“”‘’—–…·•°±×÷€£¥©®™") + ["\u3000", "\u00a0", "\u2009", "&amp;", "&lt;"])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 80))) for _ in range(count)]


def test_same_tokens_as_clip_on_random_text_after_clips_cleaning(clip, reference, tokenizer):
    # CLIP cleans text with ftfy.fix_text and html.unescape before its BPE; transformers' CLIPTokenizer
    # (the Hub's tokenizer, what diffusers and kohya use) does not. Given the cleaned text, every token
    # must agree: that pins the byte table, the split pattern, lower-casing, whitespace and every merge.
    texts = random_texts(1500)
    differ_raw = 0
    for text in texts:
        expected = clip.encode(text)
        assert ids(tokenizer, reference.basic_clean(text)) == expected, repr(text)
        differ_raw += ids(tokenizer, text) != expected
    assert differ_raw > 0  # the pool holds what the cleaning changes (curly quotes, &amp;, U+3000)


def test_what_clips_text_cleaning_changes_and_transformers_does_not(clip, tokenizer):
    # The one known difference between CLIP's tokenizer and transformers': no ftfy, no html.unescape.
    text = "“quoted” &amp; ﬁne"
    assert ids(tokenizer, text) != clip.encode(text)
    assert ids(tokenizer, "\"quoted\" & fine") == clip.encode(text)


@pytest.mark.parametrize("text", [TAGS, ", ".join([TAGS] * 3), "a " * 200, "sks dog"])
def test_77_token_truncation_matches_clip(clip, tokenizer, text):
    ours = tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids
    theirs = clip_tokenize(clip, text)
    assert ours.shape == (1, 77) and len(theirs) == 77
    n = sum(1 for t in theirs if t != 0)
    assert ours[0, :n].tolist() == theirs[:n]
    assert ours[0, n - 1] == 49407
    assert (ours[0, n:] == tokenizer.pad_token_id).all()  # the Hub's tokenizer pads with <|endoftext|>


def test_a_different_bpe_file_is_refused(tmp_path):
    import gzip

    fake = tmp_path / clip_tokenizer.CLIP_BPE_FILENAME
    fake.write_bytes(gzip.compress(b"#version: 0.2\ni n\n"))
    with pytest.raises(UserError, match=r"bpe_simple_vocab_16e6\.txt\.gz: is not OpenAI's CLIP BPE vocabulary"):
        clip_tokenizer.build_clip_tokenizer(fake)


def test_missing_openai_clip_names_the_install_command(monkeypatch):
    monkeypatch.setattr(clip_tokenizer, "find_clip_bpe_file", lambda: None)
    with pytest.raises(UserError, match=r'pip install "openai-clip==1\.0\.1"'):
        clip_tokenizer.build_clip_tokenizer()


def test_bad_merge_line_is_reported():
    with pytest.raises(ValueError, match="line 3 of the BPE file"):
        clip_tokenizer.clip_vocab_and_merges("#version: 0.2\ni n\nbroken\n")
