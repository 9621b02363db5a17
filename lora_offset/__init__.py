"""lora-offset: a LoRA trainer for Stable Diffusion 1.x built around offset noise."""

__version__ = "0.1.0"
