"""What the libraries may print: no notice a user cannot act on, no nested progress bars; real
warnings still show.

Each dropped notice is named here with the reason it says nothing to a lora-offset user. They are
dropped by a logging filter on the one logger that emits them, so every other message of that
logger (and of the library) still reaches the console. `install_filters` costs no import and runs
when `lora_offset` is imported (bitsandbytes logs its notice while it is imported);
`disable_library_progress_bars` imports transformers' and diffusers' logging modules (seconds), so
only commands that load models call it (cli.py).
"""

from __future__ import annotations

import logging

# logger name -> the start of each message it sends that is dropped, and why.
NOTICES: dict[str, dict[str, str]] = {
    "bitsandbytes.backends.cpu.ops": {
        # On CPUs with AVX512-BF16 bitsandbytes tries an optional kernel from the `kernels` package
        # at import; NF4 bases run on the CPU without it (tests/test_base_precision.py).
        "Failed to load CPU gemm_4bit_forward from kernels-community": "an optional CPU kernel, not needed",
    },
    "transformers.utils.import_utils": {
        # transformers 5 names image processors that need torchvision; SD's pipeline class mentions
        # CLIP's, and lora-offset never processes an image with it (no safety checker).
        "`CLIPImageProcessor` requires torchvision": "an image processor lora-offset never uses",
        "`SiglipImageProcessor` requires torchvision": "an image processor lora-offset never uses",
    },
    "diffusers.loaders.lora_base": {
        # A LoRA without text-encoder modules (the default: network.train_text_encoder = false).
        "No LoRA keys associated to CLIPTextModel found": "a UNet-only LoRA has none, by design",
    },
    "diffusers.loaders.peft": {
        "No LoRA keys associated to CLIPTextModel found": "a UNet-only LoRA has none, by design",
    },
}


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def install_filters() -> None:
    """Drop the NOTICES (idempotent)."""
    for name, notices in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(tuple(notices)))


def disable_library_progress_bars() -> None:
    """transformers' and diffusers' own bars ("Loading weights", "Writing model shards", pipeline
    steps) off: lora-offset shows one bar per stage of its own. Hugging Face Hub downloads keep theirs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
