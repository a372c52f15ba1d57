"""Diffusion processes: one small object per family owns what its network is fed and what it is trained on.

A process maps a 0-based step t in [0, T) to the network's noise level, puts t itself into
`Conditions.step` (for timestep tables and experts), and returns its training loss as a dict of named
per-sample terms; the training step reduces them. Samplers are functions of the prediction
`process.predict(net, x_t, t, cond)` (see `condlora.diffusion.samplers` and `guidance`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from condlora.conditions import Conditions
from condlora.diffusion.schedules import NoiseSchedule, gather

if TYPE_CHECKING:
    from condlora.config import RunConfig, SampleConfig
    from condlora.diffusion.guidance import Denoiser
    from condlora.diffusion.samplers import PerSampleNoise

Network = Callable[[torch.Tensor, torch.Tensor, Conditions], torch.Tensor]  # net(x, noise_level, cond)


class Process(Protocol):
    """What every diffusion family provides (DDPM here, IDDPM in `condlora.diffusion.iddpm`, EDM in
    `condlora.diffusion.edm`).

    `predict(net, x, t, cond)` is the family's prediction at its own time variable t (DDPM: eps at the integer
    step; EDM: the denoised image at sigma); `loss` returns named per-sample terms; `sample` draws images from
    a denoiser built on `predict` (with guidance); `preview` gives cheap sampler settings for training
    previews; `to(device)` puts the tables a training step reads on the training device, once. A process
    with training state of its own (IDDPM's importance sampler) also has `state_dict()` /
    `load_state_dict()`, which checkpoints keep.
    """

    family: str

    def predict(self, net: Network, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor: ...

    def loss(
        self, net: Network, x0: torch.Tensor, cond: Conditions, generator: torch.Generator
    ) -> dict[str, torch.Tensor]: ...

    def sample(
        self,
        denoise: Denoiser,
        noise: PerSampleNoise,
        shape: Sequence[int],
        sample: SampleConfig,
        progress: bool = False,
    ) -> torch.Tensor: ...

    def preview(self, sample: SampleConfig) -> SampleConfig: ...

    def to(self, device: torch.device | str) -> Process: ...


class UniformTimestepSampler:
    """t ~ U{0, ..., T-1} (0-based: the papers' steps 1..T): every step equally likely, so all loss weights are 1;
    with `window` (first, last), t ~ U{first, ..., last - 1} (e.g. one TimeStep Master expert's interval)."""

    def __init__(self, num_timesteps: int, window: tuple[int, ...] = ()):
        self.num_timesteps = num_timesteps
        self.low, self.high = window if window else (0, num_timesteps)

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size,) int64 steps on the generator's device."""
        return torch.randint(self.low, self.high, (batch_size,), generator=generator, device=generator.device)


class DDPM:
    """The DDPM family (Ho et al. 2020): discrete steps t in [0, T), eps prediction, the simple loss.

    Args:
        schedule: the noise schedule (betas and what derives from them).
        timestep_sampler: draws the training steps; uniform by default.
        min_snr_gamma: > 0 weights each sample's loss by min(SNR_t, gamma) / SNR_t (Min-SNR weighting, Hang et
            al. 2023, for eps prediction): the nearly clean steps, whose many small details the simple loss
            weights most, count less; 0 is the simple loss.
    """

    family = "ddpm"

    def __init__(
        self,
        schedule: NoiseSchedule,
        timestep_sampler: UniformTimestepSampler | None = None,
        min_snr_gamma: float = 0.0,
    ):
        self.schedule = schedule
        self.timestep_sampler = timestep_sampler or UniformTimestepSampler(schedule.num_timesteps)
        self.loss_weights = None
        if min_snr_gamma > 0:
            snr = schedule.snr()
            self.loss_weights = snr.clamp(max=min_snr_gamma) / snr  # (T,)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def to(self, device: torch.device | str) -> DDPM:
        """Move the schedule and loss weights to `device` (in place; returns self)."""
        self.schedule = self.schedule.to(device)
        if self.loss_weights is not None:
            self.loss_weights = self.loss_weights.to(device)
        return self

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is fed for step t: the step itself as float32 (half precision cannot hold every
        step index; IDDPM's process rescales it instead)."""
        return t.float()

    def predict(self, net: Network, x_t: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """eps_theta(x_t, t): the network's prediction, with the step handed to its conditioned layers.

        Args:
            net: `net(x, noise_level, cond)`.
            x_t: (B, C, H, W) noisy images.
            t: (B,) int64 0-based steps.
            cond: the conditions of the call; `step` is set here.
        """
        return net(x_t, self.noise_level(t), cond.replace(step=t))

    def loss(
        self,
        net: Network,
        x0: torch.Tensor,
        cond: Conditions,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """DDPM's simple loss (Ho et al. eq. 14), per sample:
        {"loss": || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) ||^2 averaged over pixels} (B,),
        times min(SNR_t, gamma) / SNR_t with Min-SNR weighting.

        Args:
            net: `net(x, noise_level, cond)`.
            x0: (B, C, H, W) clean images in [-1, 1].
            cond: the batch's conditions (labels after label dropout, ...).
            generator: source of t and eps (on x0's device).
        """
        t = self.timestep_sampler.sample(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps = self.predict(net, x_t, t, cond)
        precision = torch.promote_types(eps.dtype, torch.float32)  # bf16 predictions: reduce in float32
        loss = (eps.to(precision) - noise.to(precision)).pow(2).flatten(1).mean(dim=1)
        if self.loss_weights is not None:
            loss = loss * gather(self.loss_weights, t, loss)
        return {"loss": loss}

    def sample(
        self,
        denoise: Denoiser,
        noise: PerSampleNoise,
        shape: Sequence[int],
        sample: SampleConfig,
        progress: bool = False,
    ) -> torch.Tensor:
        """Ancestral DDPM or DDIM (as `sample.sampler` says) with `sample.steps` evaluations of eps."""
        from condlora.diffusion.samplers import ddim_sample, ddpm_sample

        if sample.sampler == "ddpm":
            return ddpm_sample(denoise, self.schedule, noise, shape, steps=sample.steps, progress=progress)
        if sample.sampler == "ddim":
            return ddim_sample(denoise, self.schedule, noise, shape, sample.steps, sample.eta, progress=progress)
        raise ValueError(f"the ddpm family samples with ddpm or ddim, not {sample.sampler!r}")

    def preview(self, sample: SampleConfig) -> SampleConfig:
        """Cheap settings for training previews: deterministic DDIM with at most 25 steps."""
        return dataclasses.replace(sample, sampler="ddim", steps=min(25, sample.steps), eta=0.0)


def process_for(cfg: RunConfig) -> Process:
    """The diffusion process a run's `diffusion` section names, from its family's section."""
    if cfg.diffusion.family == "edm":
        from condlora.data.augment import AugmentPipe
        from condlora.diffusion.edm import EDM

        return EDM(cfg.edm, AugmentPipe(cfg.edm.augment) if cfg.edm.augment > 0 else None)
    from condlora.diffusion.schedules import schedule_for

    if cfg.diffusion.family == "iddpm":
        from condlora.diffusion.iddpm import IDDPM, LossSecondMomentSampler

        d = cfg.ddpm
        sampler = LossSecondMomentSampler(d.num_timesteps) if d.timestep_sampler == "loss-second-moment" else None
        sampler = sampler or UniformTimestepSampler(d.num_timesteps, d.train_steps)
        return IDDPM(schedule_for(cfg), d.learn_sigma, d.vlb_weight, sampler)
    sampler = UniformTimestepSampler(cfg.ddpm.num_timesteps, cfg.ddpm.train_steps)
    return DDPM(schedule_for(cfg), sampler, cfg.ddpm.min_snr_gamma)
