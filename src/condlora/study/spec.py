"""What a study is: a grid of configurations x seeds trained at one budget and evaluated every K steps.

A `StudySpec` is plain data (written to `<study>/study.json`), so an interrupted study resumes from its
directory alone and a report names exactly what produced it. `grid` builds the configurations the papers
compare: conditioning modes (baseline / with_lora / lora_only / adaln_attn) crossed with omega types of
compositional TimeLoRA where a mode has LoRA.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condlora.config import ConfigError, RunConfig
from condlora.presets import PRESETS, build_config, merge_sections

MODES = ("baseline", "with_lora", "lora_only", "adaln_attn")
LORA_MODES = ("with_lora", "lora_only")
OMEGA_TYPES = ("fixed", "train", "train-onehot", "train-gaussian")
_NO_LORA = {"time": "none", "classes": "none", "uc_bases": 0, "plain": False}


@dataclass(frozen=True)
class StudyConfig:
    """One configuration of the grid: its conditioning mode, omega type ("" where it has no compositional
    TimeLoRA) and the overrides that make it from the study's preset."""

    mode: str
    omega: str
    overrides: dict[str, dict[str, Any]]

    @property
    def name(self) -> str:
        return f"{self.mode}-omega_{self.omega}" if self.omega else self.mode


@dataclass(frozen=True)
class StudySpec:
    """A study: `configs` x `seeds` runs of `preset` + `overrides`, each trained `train.steps` steps and
    evaluated at every `eval_every` steps on `eval_count` samples drawn with `eval_sample` (sampler, steps,
    guidance), then probed once more at the end under class extrapolation (class vector beta * c for each
    beta of `extrapolation`, `extrapolation_count` samples each)."""

    preset: str
    configs: tuple[StudyConfig, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_every: int = 200
    eval_count: int = 500
    eval_sample: dict[str, Any] = field(default_factory=dict)
    extrapolation: tuple[float, ...] = (-1.0, 2.0)
    extrapolation_count: int = 200

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"study: unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        if not self.configs:
            raise ConfigError("study: the grid is empty (no configuration left)")
        names = [c.name for c in self.configs]
        if len(set(names)) != len(names):
            raise ConfigError(f"study: configuration names repeat: {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study: seeds must be distinct and at least one, got {list(self.seeds)}")
        if self.eval_every < 1:
            raise ConfigError(f"study: eval_every must be >= 1, got {self.eval_every}")
        if min(self.eval_count, self.extrapolation_count) < 20:
            raise ConfigError(
                "study: eval_count and extrapolation_count must be >= 20 (two samples of each class, for diversity)"
            )
        for c in self.configs:  # every run's configuration is valid before any of them trains
            cfg = self.run_config(c.name, self.seeds[0], Path("study"))
            if (cfg.model.image_size, cfg.model.in_channels, cfg.model.num_classes) != (28, 1, 10):
                raise ConfigError(
                    f"study: {c.name}: the study's metrics use the MNIST reference classifier, so the runs "
                    f"must be 28x28 grayscale with 10 classes (got {cfg.model.image_size}x"
                    f"{cfg.model.image_size}x{cfg.model.in_channels}, {cfg.model.num_classes} classes)"
                )

    @property
    def steps(self) -> int:
        return build_config(self.preset, self.overrides).train.steps

    def config(self, name: str) -> StudyConfig:
        for c in self.configs:
            if c.name == name:
                return c
        raise ConfigError(f"study: no configuration {name!r} (have {', '.join(c.name for c in self.configs)})")

    def run_name(self, name: str, seed: int) -> str:
        return f"{name}-seed{seed}"

    def runs(self) -> list[tuple[str, int]]:
        """(configuration name, seed) of every run, seeds inner-most so early runs cover every configuration."""
        return [(c.name, s) for s in self.seeds for c in self.configs]

    def run_config(self, name: str, seed: int, run_dir: Path, device: str = "auto") -> RunConfig:
        """The full configuration of one run: checkpoints every `eval_every` steps, all kept for evaluation."""
        merged = merge_sections(self.overrides, self.config(name).overrides)
        try:
            steps = build_config(self.preset, merged).train.steps
            per_run = {
                "seed": seed,
                "out_dir": str(run_dir),
                "checkpoint_every": self.eval_every,
                "keep_checkpoints": steps // self.eval_every + 2,
                "sample_every": 0,
                "device": device,
            }
            sample = {**self.eval_sample, "count": self.eval_count}
            return build_config(self.preset, merge_sections(merged, {"train": per_run, "sample": sample}))
        except ConfigError as err:
            raise ConfigError(f"study: configuration {name}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySpec:
        try:
            configs = tuple(StudyConfig(**c) for c in data["configs"])
            rest = {k: v for k, v in data.items() if k != "configs"}
            for key in ("seeds", "extrapolation"):
                if key in rest:
                    rest[key] = tuple(rest[key])
            return cls(configs=configs, **rest)
        except (KeyError, TypeError) as err:
            raise ConfigError(f"study: not a study specification ({err})") from None

    @classmethod
    def load(cls, path: Path) -> StudySpec:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"study: {path} is not valid JSON ({err})") from None


def grid(
    preset: str,
    modes: tuple[str, ...] = MODES,
    omegas: tuple[str, ...] = ("fixed",),
    overrides: dict[str, dict[str, Any]] | None = None,
    skip: tuple[str, ...] = (),
) -> tuple[StudyConfig, ...]:
    """The configurations of `modes` x `omegas` on `preset`: modes without LoRA turn every LoRA bank off; modes
    with LoRA keep the preset's banks and, where it has compositional TimeLoRA, take each omega type
    (fixed, train, or train-<init> for a trained omega from another initialisation). `skip` drops
    configurations by name."""
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"study: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    for omega in omegas:
        if omega not in OMEGA_TYPES:
            raise ConfigError(f"study: unknown omega type {omega!r} (choose from {', '.join(OMEGA_TYPES)})")
    lora = build_config(preset, overrides or {}).lora
    configs = []
    for mode in modes:
        model = {"model": {"conditioning": mode}}
        if mode not in LORA_MODES:
            configs.append(StudyConfig(mode, "", {**model, "lora": dict(_NO_LORA)}))
            continue
        if not (lora.time != "none" or lora.classes != "none" or lora.uc_bases or lora.plain):
            raise ConfigError(f"study: mode {mode} needs LoRA banks, and preset {preset} has none")
        if lora.time != "compositional":
            configs.append(StudyConfig(mode, "", model))
            continue
        for omega in omegas:
            trained = {"omega": "train", "omega_init": omega.split("-")[1]} if "-" in omega else {"omega": omega}
            configs.append(StudyConfig(mode, omega, {**model, "lora": trained}))
    unknown = set(skip) - {c.name for c in configs}
    if unknown:
        raise ConfigError(f"study: --skip names no configuration: {sorted(unknown)}")
    return tuple(c for c in configs if c.name not in skip)
