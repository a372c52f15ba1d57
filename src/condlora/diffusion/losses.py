"""Training losses: each returns an unreduced per-sample loss; the training step reduces."""

from __future__ import annotations

from collections.abc import Callable

import torch

from condlora.diffusion.schedules import NoiseSchedule

Denoiser = Callable[..., torch.Tensor]


class UniformTimestepSampler:
    """t ~ U{0, ..., T-1} (0-based: the papers' steps 1..T): every step equally likely, so all loss weights are 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size,) int64 steps on the generator's device."""
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=generator.device)


class EpsilonLoss:
    """DDPM's simple loss (Ho et al. eq. 14): || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) ||^2.

    Args:
        schedule: the noise schedule.
        timestep_sampler: draws t; uniform by default.
    """

    def __init__(self, schedule: NoiseSchedule, timestep_sampler: UniformTimestepSampler | None = None):
        self.schedule = schedule
        self.timestep_sampler = timestep_sampler or UniformTimestepSampler(schedule.num_timesteps)

    def __call__(
        self,
        net: Denoiser,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Per-sample mean squared error, shape (B,).

        Args:
            net: eps-prediction network `net(x_t, t, labels)`.
            x0: (B, C, H, W) clean images in [-1, 1].
            labels: (B,) class labels (NULL_LABEL for dropped ones) or None.
            generator: source of t and eps (on x0's device).
        """
        t = self.timestep_sampler.sample(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps = net(x_t, t.float(), labels)  # float32: half precision cannot hold every step index
        return (eps - noise).pow(2).flatten(1).mean(dim=1)
