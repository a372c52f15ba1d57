"""Discrete DDPM noise schedules (Ho et al. 2020; Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from condlora.config import RunConfig

ScheduleName = Literal["linear", "cosine"]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, rescaled so that any T keeps the same end points per unit of diffusion time.

    beta_start and beta_end are given for T = 1000 (Ho et al.): beta_t = linspace(1000/T * beta_start,
    1000/T * beta_end, T), as in IDDPM's `get_named_beta_schedule("linear")`.
    """
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """IDDPM's cosine schedule: alpha_bar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), betas clipped at max_beta."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """Quantities derived from betas, all (T,) float64 on the betas' device (the CPU unless moved with `to`);
    index t = 0..T-1 is DDPM step t+1.

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (Ho et al. eq. 4).
    """

    betas: torch.Tensor

    @classmethod
    def create(
        cls,
        name: ScheduleName,
        num_timesteps: int,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> NoiseSchedule:
        """Build the named schedule with `num_timesteps` steps."""
        if name == "linear":
            return cls(linear_betas(num_timesteps, beta_start, beta_end))
        if name == "cosine":
            return cls(cosine_betas(num_timesteps))
        raise ValueError(f"unknown schedule {name!r}; expected 'linear' or 'cosine'")

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The schedule with its tables on `device` (where a training step gathers from them)."""
        return NoiseSchedule(self.betas.to(device))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t = prod_{s <= t} (1 - beta_s)."""
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """alpha_bar_{t-1}, with alpha_bar_{-1} = 1."""
        ab = self.alphas_cumprod
        return torch.cat([ab.new_ones(1), ab[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)  (Ho et al. eq. 7)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) given the noise: sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps.

        Args:
            x0: (B, ...) clean data.
            t: (B,) int64 step indices in [0, T).
            noise: eps, same shape as x0.
        """
        ab = gather(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def schedule_for(cfg: RunConfig) -> NoiseSchedule:
    """The noise schedule a run's `ddpm` section describes (used for training and sampling alike)."""
    d = cfg.ddpm
    return NoiseSchedule.create(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as a (B, 1, ..., 1) tensor broadcastable to `like`, in like's dtype and device. Keep `values`
    on like's device (the processes' `to`): copying a table from the host stalls a GPU's stream."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))
