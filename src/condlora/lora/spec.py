"""A LoRA recipe bound to a network: the `lora` config section plus the sizes its strategies need."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from torch import nn

from condlora.config import ConfigError, LoRAConfig, convert
from condlora.lora.layer import layer_shape
from condlora.lora.strategies import UCMLP, ClassSelect, ClassTable, PlainLoRA, TimestepExperts, TimeTable


@dataclass
class LoRASpec(LoRAConfig):
    """Everything needed to rebuild the same LoRA layers (saved with the adapters): the fields of the `lora`
    config section (one set of names everywhere) plus the network's sizes.

    Attributes (besides LoRAConfig's):
        num_timesteps: T of the omega tables.
        num_classes: C of ClassLoRA.
        embedding_dim: D of the shared condition embedding UC-LoRA reads (filled in by the backbone).
    """

    num_timesteps: int = 1000
    num_classes: int = 0
    embedding_dim: int = 0

    @classmethod
    def from_config(cls, cfg: LoRAConfig, **sizes: int) -> LoRASpec:
        """Bind a `lora` config section to a network's sizes."""
        return cls(**dataclasses.asdict(cfg), **sizes)

    def with_targets(self, default: tuple[str, ...]) -> LoRASpec:
        """This spec with `default` targets (a backbone's attention projections) if none were given."""
        return self if self.targets else dataclasses.replace(self, targets=tuple(default))

    def strategies(self, name: str, base_layer: nn.Module) -> dict[str, nn.Module]:
        """Fresh strategy modules for one layer (each layer owns its omega table / MLP)."""
        banks: dict[str, nn.Module] = {}
        if self.plain:
            banks["plain"] = PlainLoRA()
        if self.time == "compositional":
            banks["time"] = TimeTable(self.num_timesteps, self.time_bases, self.omega == "train", self.omega_init)
        elif self.time == "noncompositional":
            banks["time"] = TimeTable(self.num_timesteps, self.num_timesteps, trainable=False, init="onehot")
        if self.classes == "select":
            banks["class"] = ClassSelect(self.num_classes)
        elif self.classes == "compositional":
            banks["class"] = ClassTable(self.num_classes, self.class_bases)
        if self.uc_bases > 0:
            if self.embedding_dim < 1:
                raise ValueError("UC-LoRA needs the backbone's embedding width (LoRASpec.embedding_dim)")
            banks["uc"] = UCMLP(self.embedding_dim, self.uc_bases, self.uc_widths)
        if self.tsm_scales:
            c_in, _, channel_dim = layer_shape(base_layer)
            banks["tsm"] = TimestepExperts(
                self.num_timesteps,
                self.tsm_scales,
                c_in,
                channel_dim,
                self.tsm_stage,
                self.tsm_scale,
                self.tsm_router,
                self.tsm_core,
            )
        return banks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRASpec:
        """Inverse of `to_dict` (JSON lists become tuples); unknown fields are an error naming them."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown LoRA fields {sorted(unknown)}; expected some of {sorted(names)}")
        return cls(**{key: convert(value, hints[key], f"lora.{key}") for key, value in data.items()})
