"""The EDM family (Karras et al. 2022): continuous noise levels sigma, preconditioning, its loss and Heun sampler.

The network keeps condlora's contract `net(x, noise_level, cond) -> F`; the preconditioning here makes the
denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), with (EDM Table 1)
c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
c_noise = ln(sigma) / 4 and sd = sigma_data. A sampler's "t" is sigma itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from condlora.conditions import Conditions
from condlora.diffusion.guidance import Denoiser
from condlora.diffusion.process import Network
from condlora.diffusion.samplers import PerSampleNoise

if TYPE_CHECKING:
    from condlora.config import EDMConfig, SampleConfig
    from condlora.data.augment import AugmentPipe


def precondition(
    net: Network,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Conditions,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise | cond) (EDM eq. 7 and Table 1).

    Args:
        net: the raw network `net(x, noise_level, cond)`.
        x: (B, C, H, W) noisy images, x = y + sigma n.
        sigma: (B,) noise levels (standard deviations), > 0.
        cond: the call's conditions.
        sigma_data: standard deviation of the data.
    Returns:
        (B, C, H, W) denoised images in x's dtype (float32 arithmetic for half-precision networks).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    s = sigma.to(dtype).reshape(-1, *[1] * (x.dim() - 1))  # (B, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (s**2 + sigma_data**2).sqrt()
    c_noise = s.flatten().log() / 4
    net_dtype = next((p.dtype for p in net.parameters()), dtype) if isinstance(net, nn.Module) else dtype
    out = net((c_in * x).to(net_dtype), c_noise.to(net_dtype), cond)
    return c_skip * x + c_out * out.to(dtype)


class EDMPrecond(nn.Module):
    """The published `EDMPrecond` as a module: the raw network under `.model` (so a published network's
    state_dict, keys `model.*`, loads with strict=True) and `forward(x, sigma, cond) -> D(x; sigma)`."""

    def __init__(self, model: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.model, self.sigma_data = model, sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditions | None = None) -> torch.Tensor:
        return precondition(self.model, x, sigma, cond if cond is not None else Conditions(), self.sigma_data)


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (eq. 5): sigma_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho
    for i = 0 .. N - 1, then sigma_N = 0: (N + 1,) float64, decreasing."""
    if steps < 2:
        raise ValueError(f"the EDM sampler needs at least 2 steps, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (steps - 1) * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(
    denoise: Denoiser,
    sigmas: torch.Tensor,
    noise: PerSampleNoise,
    shape: Sequence[int],
    churn: float = 0.0,
    churn_min: float = 0.0,
    churn_max: float = float("inf"),
    churn_noise: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """EDM's sampler (Algorithm 2): Heun's 2nd-order method on the probability-flow ODE dx/dsigma = (x - D) / sigma,
    with optional churn (S_churn, S_min, S_max, S_noise); churn = 0 is the deterministic Algorithm 1.
    N steps take 2N - 1 evaluations of D (the last step is Euler, to sigma = 0).

    Args:
        denoise: D(x, sigma) with sigma (B,); conditions and guidance bound.
        sigmas: (N + 1,) decreasing noise levels ending with 0 (see `karras_sigmas`).
        noise: per-sample noise (also the batch size).
        shape: (C, H, W) of one image.
        churn, churn_min, churn_max, churn_noise: S_churn, S_min, S_max, S_noise.
        progress: show a progress bar.
    Returns:
        (B, C, H, W) samples, float32.
    """
    steps = len(sigmas) - 1
    gamma_max = min(churn / steps, 2**0.5 - 1)
    levels = sigmas.tolist()
    x = noise.randn(shape).double() * levels[0]
    batch = x.shape[0]

    def slope(x_at: torch.Tensor, s: float) -> torch.Tensor:
        sigma = torch.full((batch,), s, dtype=torch.float64, device=x.device)
        return (x_at - denoise(x_at, sigma).double()) / s

    for i in tqdm(range(steps), disable=not progress, desc="heun", leave=False):
        s_cur, s_next = levels[i], levels[i + 1]
        gamma = gamma_max if churn > 0 and churn_min <= s_cur <= churn_max else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:  # raise the noise level to s_hat: add fresh noise of the missing variance
            x = x + (s_hat**2 - s_cur**2) ** 0.5 * churn_noise * noise.randn(shape).double()
        d = slope(x, s_hat)
        x_next = x + (s_next - s_hat) * d  # Euler step
        if s_next > 0:  # 2nd-order correction (trapezoidal rule)
            x_next = x + (s_next - s_hat) * 0.5 * (d + slope(x_next, s_next))
        x = x_next
    return x.float()


class EDM:
    """The EDM family: sigma ~ exp(N(P_mean, P_std^2)) in training, loss weight lambda(sigma) =
    (sigma^2 + sd^2) / (sigma sd)^2 (EDM Table 1), optional non-leaking augmentation whose labels reach the
    network as `Conditions.augment`, and the Heun sampler.

    Args:
        cfg: the `edm` config section (noise distribution, sigma_data, sampler settings).
        augment: the augmentation pipeline, or None.
    """

    family = "edm"

    def __init__(self, cfg: EDMConfig, augment: AugmentPipe | None = None):
        self.cfg, self.augment = cfg, augment

    def noise_level(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise = ln(sigma) / 4, what the raw network is fed."""
        return sigma.log() / 4

    def predict(self, net: Network, x: torch.Tensor, sigma: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """The denoiser D(x; sigma | cond)."""
        return precondition(net, x, sigma, cond, self.cfg.sigma_data)

    def loss(
        self,
        net: Network,
        x0: torch.Tensor,
        cond: Conditions,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """EDM's loss (eq. 8), per sample: {"loss": lambda(sigma) * mean over pixels of (D(y + sigma n; sigma) - y)^2}.

        The published code sums over pixels; the mean differs by the constant C*H*W, which Adam ignores.
        y is x0 after augmentation (its labels go into `cond.augment`).
        """
        cfg = self.cfg
        b = x0.shape[0]
        sigma = (torch.randn(b, generator=generator, device=x0.device) * cfg.P_std + cfg.P_mean).exp()
        y = x0
        if self.augment is not None:
            y, labels = self.augment(x0, generator)
            cond = cond.replace(augment=labels)
        n = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        denoised = self.predict(net, y + sigma.reshape(-1, 1, 1, 1) * n, sigma, cond)
        weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
        error = (denoised.float() - y.float()).pow(2).flatten(1).mean(dim=1)
        return {"loss": weight * error}

    def sample(
        self,
        denoise: Denoiser,
        noise: PerSampleNoise,
        shape: Sequence[int],
        sample: SampleConfig,
        progress: bool = False,
    ) -> torch.Tensor:
        """Heun sampling with `sample.steps` noise levels (2 steps - 1 evaluations), churn from the edm section."""
        if sample.sampler != "heun":
            raise ValueError(f"the edm family samples with heun, not {sample.sampler!r}")
        cfg = self.cfg
        sigmas = karras_sigmas(sample.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        return heun_sample(
            denoise, sigmas, noise, shape, cfg.S_churn, cfg.S_min, cfg.S_max, cfg.S_noise, progress=progress
        )

    def to(self, device: torch.device | str) -> EDM:
        """EDM keeps no tables: sigma is drawn and every weight computed on the device."""
        return self

    def preview(self, sample: SampleConfig) -> SampleConfig:
        """Cheap settings for training previews: at most 18 Heun steps."""
        return dataclasses.replace(sample, steps=min(sample.steps, 18))
