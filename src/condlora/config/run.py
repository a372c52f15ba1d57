"""The complete run configuration: its sections, the checks across sections, JSON round trips and the
reading of older config versions."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from condlora.config.backbones import DdpmppConfig, IddpmConfig, NanoConfig
from condlora.config.fields import ConfigError, check, convert
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

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "nano": NanoConfig,
    "iddpm": IddpmConfig,
    "ddpmpp": DdpmppConfig,
    "lora": LoRAConfig,
    "diffusion": DiffusionConfig,
    "ddpm": DDPMConfig,
    "edm": EDMConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}
CONFIG_VERSION = 2  # written into config.json and checkpoints; 0.1 files have none (version 1)


@dataclass
class RunConfig:
    """A complete run: one instance of each section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    nano: NanoConfig = field(default_factory=NanoConfig)
    iddpm: IddpmConfig = field(default_factory=IddpmConfig)
    ddpmpp: DdpmppConfig = field(default_factory=DdpmppConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        self._check_conditioning()
        self._check_family()
        check(
            self.sample.class_label < max(self.model.num_classes, 1) or self.sample.class_label == -1,
            "sample",
            "class_label",
            f"must be -1 or in [0, {self.model.num_classes - 1}]",
            self.sample.class_label,
        )
        check(
            self.model.backbone != "diffusers" or bool(self.train.init_from),
            "train",
            "init_from",
            "the diffusers backbone is read from a local model folder: give its path",
            self.train.init_from,
        )
        if self.model.backbone in ("ddpmpp", "iddpm"):
            self._check_resolutions()

    def _check_resolutions(self) -> None:
        """The U-Nets that halve exactly: image size against their levels and attention resolutions."""
        name = self.model.backbone
        arch = getattr(self, name)
        size, levels = self.model.image_size, len(arch.channel_mult) - 1
        check(
            size % (1 << levels) == 0,
            "model",
            "image_size",
            f"must be divisible by 2^{levels} ({name}.channel_mult has {levels + 1} levels)",
            size,
        )
        field = "attention_resolutions" if name == "iddpm" else "attn_resolutions"
        reachable = [size >> k for k in range(levels + 1)]
        check(
            all(r in reachable for r in getattr(arch, field)),
            name,
            field,
            f"each must be one of the network's resolutions {reachable}",
            getattr(arch, field),
        )

    def _check_family(self) -> None:
        family, sampler = self.diffusion.family, self.sample.sampler
        if family == "edm":
            check(sampler == "heun", "sample", "sampler", "the edm family samples with heun", sampler)
            check(self.sample.steps >= 2, "sample", "steps", "heun needs at least 2 noise levels", self.sample.steps)
            check(
                self.lora.time == "none",
                "lora",
                "time",
                "TimeLoRA reads discrete steps, which the continuous edm family has none of; use UC-LoRA",
                self.lora.time,
            )
            check(
                not self.lora.tsm_scales,
                "lora",
                "tsm_scales",
                "TimeStep Master experts read discrete steps, which the continuous edm family has none of",
                self.lora.tsm_scales,
            )
            check(
                self.edm.augment == 0 or self.model.backbone == "ddpmpp",
                "edm",
                "augment",
                f"augmentation labels need the ddpmpp backbone (the {self.model.backbone} network cannot take "
                "them, so augmentations would leak into samples); set 0",
                self.edm.augment,
            )
            return
        check(
            sampler in ("ddpm", "ddim"), "sample", "sampler", f"the {family} family samples with ddpm or ddim", sampler
        )
        if family == "ddpm":
            for name, plain in (("learn_sigma", False), ("timestep_sampler", "uniform")):
                value = getattr(self.ddpm, name)
                check(value == plain, "ddpm", name, "is an iddpm setting: set diffusion.family iddpm", value)
        else:
            gamma = self.ddpm.min_snr_gamma
            check(
                gamma == 0,
                "ddpm",
                "min_snr_gamma",
                "is a ddpm-family setting (the hybrid loss weighs itself): set 0",
                gamma,
            )
        check(
            not self.ddpm.learn_sigma or self.model.backbone == "iddpm",
            "ddpm",
            "learn_sigma",
            f"needs a network with 2C outputs (backbone iddpm), not {self.model.backbone}",
            self.ddpm.learn_sigma,
        )
        T = self.ddpm.num_timesteps
        check(
            self.lora.time != "compositional" or self.lora.time_bases <= T,
            "lora",
            "time_bases",
            f"must be <= ddpm.num_timesteps = {T}",
            self.lora.time_bases,
        )
        check(self.sample.steps <= T, "sample", "steps", f"must be <= ddpm.num_timesteps = {T}", self.sample.steps)
        window = self.ddpm.train_steps
        check(
            not window or (len(window) == 2 and 0 <= window[0] < window[1] <= T),
            "ddpm",
            "train_steps",
            f"must be two steps first,last with 0 <= first < last <= {T}",
            window,
        )
        check(
            not window or self.ddpm.timestep_sampler == "uniform",
            "ddpm",
            "train_steps",
            "a step window needs the uniform timestep sampler",
            window,
        )

    def _check_conditioning(self) -> None:
        banks, mode, lora = self.lora.conditioned, self.model.conditioning, self.lora
        check(
            banks or mode not in ("with_lora", "lora_only"),
            "model",
            "conditioning",
            "with_lora / lora_only need lora.time, lora.classes, lora.uc_bases or lora.tsm_scales",
            mode,
        )
        check(
            not banks or mode in ("with_lora", "lora_only"),
            "model",
            "conditioning",
            "conditioned LoRA banks are set, so conditioning must be with_lora or lora_only",
            mode,
        )
        if mode == "lora_only" and lora.uc_bases == 0:
            check(lora.time != "none", "lora", "time", "lora_only needs TimeLoRA or UC-LoRA", "none")
            check(
                self.model.num_classes == 0 or lora.classes != "none",
                "lora",
                "classes",
                "lora_only removes the class embedding: a class-conditional model needs ClassLoRA or UC-LoRA",
                lora.classes,
            )
        check(
            lora.classes == "none" or self.model.num_classes > 0,
            "lora",
            "classes",
            "needs a class-conditional model (model.num_classes > 0)",
            lora.classes,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-ready), with the config version."""
        sections = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        return {"config_version": CONFIG_VERSION, **sections}

    @classmethod
    def from_dict(
        cls, data: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]] | None = None
    ) -> RunConfig:
        """Inverse of `to_dict`, with `overrides` ({section: {field: value}}) applied on top; unknown
        sections or fields raise ConfigError. Values may be strings (from the command line)."""
        data = upgrade(data)
        merged = {section: dict(values) for section, values in data.items()}
        for section, values in (overrides or {}).items():
            merged.setdefault(section, {}).update(values)
        unknown = set(merged) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}; expected {list(SECTIONS)}")
        return cls(**{name: make_section(name, merged.get(name, {})) for name in SECTIONS})


# condlora 0.1 (config version 1) kept the nano architecture and the LoRA settings in `model` and the DDPM
# settings in `diffusion`; version 2 gives each its own section. Old name -> (new section, new name).
_MOVED_IN_V2 = {
    "model": {
        **{
            name: ("nano", name)
            for name in ("channels", "channel_mult", "num_res_blocks", "attn_levels", "num_heads", "dropout")
        },  # fmt: skip
        **{
            name: ("lora", name)
            for name in ("time_bases", "omega", "omega_init", "class_bases", "uc_bases", "uc_widths")
        },  # fmt: skip
        "lora_rank": ("lora", "rank"),
        "lora_targets": ("lora", "targets"),
        "time_lora": ("lora", "time"),
        "class_lora": ("lora", "classes"),
        "lora_bias": ("lora", "basis_bias"),
    },
    "diffusion": {name: ("ddpm", name) for name in ("num_timesteps", "schedule", "beta_start", "beta_end")},
}


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration in the current layout: version 2 as is, 0.1's (no version) with its fields moved
    to their new sections; any other version is an error naming it. Dicts without sections pass through."""
    data = dict(data)
    version = data.pop("config_version", None)
    if version == CONFIG_VERSION:
        return data
    if version is not None:
        raise ConfigError(
            f"config version {version!r} is not supported; this condlora reads versions 1 (condlora 0.1) "
            f"and {CONFIG_VERSION}"
        )
    if not any(old in data.get(section, {}) for section, moves in _MOVED_IN_V2.items() for old in moves):
        return data  # a partial dict (a preset, overrides): nothing to move
    out = {section: dict(values) for section, values in data.items()}
    for section, moves in _MOVED_IN_V2.items():
        for old, (new_section, new) in moves.items():
            if old in out.get(section, {}):
                out.setdefault(new_section, {})[new] = out[section].pop(old)
    targets = out.get("lora", {}).get("targets")
    if targets is not None and tuple(targets) == ("*.qkv", "*.proj"):
        out["lora"]["targets"] = ()  # 0.1 spelled out the nano attention projections, the default now
    return out


def differences(before: Any, after: Any, section: str) -> list[str]:
    """`section.field: before -> after` for each field in which two instances of one section differ."""
    return [
        f"{section}.{f.name}: {getattr(before, f.name)!r} -> {getattr(after, f.name)!r}"
        for f in dataclasses.fields(before)
        if getattr(before, f.name) != getattr(after, f.name)
    ]


def make_section(name: str, values: dict[str, Any]) -> Any:
    """Build section `name` from a dict of (possibly string) values, converting each to its field type."""
    section_type = SECTIONS[name]
    hints = typing.get_type_hints(section_type)
    fields = {f.name for f in dataclasses.fields(section_type)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown field; {name} has {sorted(fields)}")
        kwargs[key] = convert(value, hints[key], f"{name}.{key}")
    return section_type(**kwargs)


def field_help(section: str) -> list[tuple[str, Any, Any, str]]:
    """(name, annotation, default, help) of each field of a section, for building command-line options."""
    section_type = SECTIONS[section]
    hints = typing.get_type_hints(section_type)
    return [(f.name, hints[f.name], f.default, f.metadata["help"]) for f in dataclasses.fields(section_type)]
