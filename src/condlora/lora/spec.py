"""A LoRA conditioning recipe: which adapter banks every targeted layer gets, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

from condlora.lora.strategies import UCMLP, ClassSelect, ClassTable, OmegaInit, TimeTable

TimeLoRAKind = Literal["none", "compositional", "noncompositional"]
ClassLoRAKind = Literal["none", "select", "compositional"]


@dataclass(frozen=True)
class LoRASpec:
    """Everything needed to rebuild the same conditioned LoRA layers (saved as adapter_config.json).

    Attributes:
        targets: fnmatch patterns of the module names to wrap.
        rank: r of every adapter.
        time: TimeLoRA bank: none, compositional (m+1 bases and an omega table) or noncompositional (T bases).
        num_timesteps: T of the omega tables.
        time_bases: m + 1 for the compositional table.
        omega_trainable: learn the omega table ("train") or keep it fixed ("linear interpolation").
        omega_init: linear, onehot or gaussian.
        classes: ClassLoRA bank: none, select (one adapter per class) or compositional (class_bases).
        num_classes: C.
        class_bases: bases of the compositional ClassLoRA.
        uc_bases: m of UC-LoRA (0 = off).
        uc_widths: hidden widths of the UC-LoRA MLP.
        embedding_dim: D of the shared condition embedding UC-LoRA reads.
        basis_bias: the zero-initialised per-basis bias of the published UC-LoRA code.
    """

    targets: tuple[str, ...] = ("*.qkv", "*.proj")
    rank: int = 4
    time: TimeLoRAKind = "none"
    num_timesteps: int = 1000
    time_bases: int = 11
    omega_trainable: bool = False
    omega_init: OmegaInit = "linear"
    classes: ClassLoRAKind = "none"
    num_classes: int = 0
    class_bases: int = 10
    uc_bases: int = 0
    uc_widths: tuple[int, ...] = (128, 64)
    embedding_dim: int = 0
    basis_bias: bool = False

    @property
    def active(self) -> bool:
        """Whether any bank is enabled."""
        return self.time != "none" or self.classes != "none" or self.uc_bases > 0

    def strategies(self, name: str, base_layer: nn.Module) -> dict[str, nn.Module]:
        """Fresh strategy modules for one layer (each layer owns its omega table / MLP)."""
        banks: dict[str, nn.Module] = {}
        if self.time == "compositional":
            banks["time"] = TimeTable(self.num_timesteps, self.time_bases, self.omega_trainable, self.omega_init)
        elif self.time == "noncompositional":
            banks["time"] = TimeTable(self.num_timesteps, self.num_timesteps, trainable=False, init="onehot")
        if self.classes == "select":
            banks["class"] = ClassSelect(self.num_classes)
        elif self.classes == "compositional":
            banks["class"] = ClassTable(self.num_classes, self.class_bases)
        if self.uc_bases > 0:
            banks["uc"] = UCMLP(self.embedding_dim, self.uc_bases, self.uc_widths)
        return banks

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoRASpec:
        fields = {**data, "targets": tuple(data["targets"]), "uc_widths": tuple(data["uc_widths"])}
        return cls(**fields)
