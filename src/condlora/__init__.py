"""condlora: condition-aware LoRA for diffusion models."""

__version__ = "0.1.0"
