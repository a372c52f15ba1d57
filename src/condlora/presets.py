"""Named run configurations. Presets are data: each is a dict of overrides on the `RunConfig` defaults."""

from __future__ import annotations

from typing import Any

from condlora.config import ConfigError, RunConfig

_WITH_LORA = {"conditioning": "with_lora"}
_TIME_CLASS_LORA = {"time": "compositional", "classes": "select"}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The main job: class-conditional nano U-Net with TimeLoRA + ClassLoRA on its attention layers, beside the
    # usual scale-and-shift, on the 5,000 bundled MNIST digits; under 10 minutes on 2 CPU cores.
    "mnist-nano": {"model": _WITH_LORA, "lora": _TIME_CLASS_LORA},
    # The same network conditioned by scale-and-shift alone (the papers' baseline).
    "mnist-nano-baseline": {},
    # Attention conditioned by LoRA alone: no time / class embeddings, no scale-and-shift.
    "mnist-nano-lora-only": {"model": {"conditioning": "lora_only"}, "lora": _TIME_CLASS_LORA},
    # UC-LoRA on the shared embedding (MLP widths 50, 50 as in the paper's nano experiment).
    "mnist-nano-uc-lora": {"model": _WITH_LORA, "lora": {"uc_bases": 10, "uc_widths": (50, 50)}},
    "mnist-nano-uncond": {"model": {"num_classes": 0}, "sample": {"guidance_scale": 1.0}},
    # scikit-learn's 1,797 8x8 digits: a seconds-scale smoke configuration.
    "digits-nano": {
        "data": {"dataset": "digits"},
        "model": {"image_size": 8},
        "nano": {"channels": 16, "channel_mult": (1, 2), "attn_levels": (1,)},
        "train": {"steps": 300, "batch_size": 64, "sample_every": 0, "checkpoint_every": 100},
        "sample": {"count": 20, "steps": 50},
    },
    # CIFAR-10 from a local python-batches directory (pass --data.dataset PATH); meant for a GPU.
    "cifar10-nano": {
        "data": {"dataset": "cifar-10-batches-py", "hflip": True},
        "model": {"image_size": 32, "in_channels": 3},
        "nano": {"channels": 32, "channel_mult": (1, 2, 2)},
        "train": {
            "steps": 100_000,
            "batch_size": 128,
            "lr": 2e-4,
            "sample_every": 5000,
            "checkpoint_every": 5000,
        },
    },
}


def build_config(preset: str, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """The preset's configuration with `overrides` ({section: {field: value}}) applied on top.

    Values may be strings (from the command line); each is converted and validated by its field.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[preset], overrides)
