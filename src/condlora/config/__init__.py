"""Typed, validated run configuration: data, model, diffusion, training and sampling sections.

Every field carries its help text (shown by `condlora train --help`) and is checked in `__post_init__`,
so a bad value fails at construction with a message naming the field and the allowed values.

The sections live in `sections` (data, model, lora, diffusion, ddpm, edm, train, sample) and `backbones`
(one architecture section per network), their building blocks in `fields`, and `RunConfig` with the checks
across sections in `run`.
"""

from condlora.config.backbones import DdpmppConfig, IddpmConfig, NanoConfig
from condlora.config.fields import ConfigError, convert, literal_choices
from condlora.config.run import CONFIG_VERSION, SECTIONS, RunConfig, differences, field_help, make_section, upgrade
from condlora.config.sections import (
    DataConfig,
    DDPMConfig,
    DiffusionConfig,
    EDMConfig,
    LoRAConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_VERSION",
    "SECTIONS",
    "ConfigError",
    "DDPMConfig",
    "DataConfig",
    "DdpmppConfig",
    "DiffusionConfig",
    "EDMConfig",
    "IddpmConfig",
    "LoRAConfig",
    "ModelConfig",
    "NanoConfig",
    "RunConfig",
    "SampleConfig",
    "TrainConfig",
    "convert",
    "differences",
    "field_help",
    "literal_choices",
    "make_section",
    "upgrade",
]
