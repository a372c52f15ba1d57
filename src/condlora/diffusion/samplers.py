"""Samplers for discrete-time eps-prediction models: ancestral DDPM and DDIM, with any number of steps.

Each sampler is a plain function over a denoiser `eps(x_t, t)` (conditions and guidance bound, see
`condlora.diffusion.guidance.guided`) and a schedule. Timesteps are 0-based
throughout condlora: t in [0, T), where t = 0 is the papers' step 1 (least noise) and t = T - 1 their step T;
a caller counting 1..T must subtract one. Randomness comes from
`PerSampleNoise`, one generator per sample, so a sample depends on its seed alone, not on the batch it
was drawn in nor on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from condlora.diffusion.guidance import Denoiser
from condlora.diffusion.schedules import NoiseSchedule


class PerSampleNoise:
    """Gaussian noise drawn on the CPU from one generator per sample (seeded by the sample's seed).

    Args:
        seeds: one integer seed per sample of the batch.
        device: where the returned tensors live.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """(B, *shape) standard normal noise, row i from generator i."""
        rows = [torch.randn(tuple(shape), generator=g) for g in self.generators]
        if self.device.type != "cuda":
            return torch.stack(rows).to(self.device)
        staged = torch.empty((len(rows), *shape), pin_memory=True)  # a copy from pinned memory does not stall
        return torch.stack(rows, out=staged).to(self.device, non_blocking=True)  # the GPU's queue


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` step indices evenly spaced over [0, T-1], in decreasing order, always including T-1 and 0."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    grid = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return grid.tolist()


def _predict_x0(
    eps_fn: Denoiser, x: torch.Tensor, t: int, ab: float, clip_denoised: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x0_hat, eps_hat); when clipping x0 to [-1, 1], eps is recomputed to stay consistent."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # 0-based step index
    eps = eps_fn(x, t_batch)
    x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5  # invert q(x_t | x_0) (Ho et al. eq. 4)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        eps = (x - ab**0.5 * x0) / (1 - ab) ** 0.5
    return x0, eps


def _step_pairs(schedule: NoiseSchedule, steps: int | None) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar_prev) for each step of a respaced chain; the last prev is 1 (x_0)."""
    ts = respaced_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps)
    ab = schedule.alphas_cumprod.tolist()
    prev = [ab[s] for s in ts[1:]] + [1.0]
    return [(t, ab[t], p) for t, p in zip(ts, prev, strict=True)]


@torch.no_grad()
def ddpm_sample(
    eps_fn: Denoiser,
    schedule: NoiseSchedule,
    noise: PerSampleNoise,
    shape: Sequence[int],
    steps: int | None = None,
    clip_denoised: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x0_hat) (Ho et al. eqs. 6-7).

    With fewer steps than T the chain is respaced (Nichol & Dhariwal sec. 4): each step uses
    beta_t = 1 - alpha_bar_t / alpha_bar_prev and the posterior variance beta~_t.

    Args:
        eps_fn: eps(x_t, t) with t (B,) the int64 0-based step index in [0, T) (T - 1 first, 0 last).
        schedule: the training noise schedule.
        noise: per-sample noise; the batch size is len(noise.generators).
        shape: (C, H, W) of one image.
        steps: number of network evaluations (default T).
        clip_denoised: clamp the predicted x0 to [-1, 1] at each step.
        progress: show a progress bar.
    Returns:
        (B, C, H, W) samples.
    """
    x = noise.randn(shape)
    for t, ab, ab_prev in tqdm(_step_pairs(schedule, steps), disable=not progress, desc="ddpm", leave=False):
        x0, _ = _predict_x0(eps_fn, x, t, ab, clip_denoised)
        beta = 1 - ab / ab_prev
        mean = (ab_prev**0.5 * beta / (1 - ab)) * x0 + ((1 - ab_prev) * (1 - beta) ** 0.5 / (1 - ab)) * x
        var = beta * (1 - ab_prev) / (1 - ab)
        x = mean + var**0.5 * noise.randn(shape) if var > 0 else mean
    return x


@torch.no_grad()
def ddim_sample(
    eps_fn: Denoiser,
    schedule: NoiseSchedule,
    noise: PerSampleNoise,
    shape: Sequence[int],
    steps: int = 50,
    eta: float = 0.0,
    clip_denoised: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z.

    s = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev); eta = 0 is deterministic given
    x_T, eta = 1 is ancestral DDPM on the respaced chain.

    Args: as `ddpm_sample`, plus
        steps: number of network evaluations.
        eta: stochasticity in [0, 1].
    """
    x = noise.randn(shape)
    for t, ab, ab_prev in tqdm(_step_pairs(schedule, steps), disable=not progress, desc="ddim", leave=False):
        x0, eps = _predict_x0(eps_fn, x, t, ab, clip_denoised)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        x = ab_prev**0.5 * x0 + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * noise.randn(shape)
    return x
