"""The IDDPM family (Nichol & Dhariwal 2021): DDPM with a learned variance, the hybrid loss, importance-sampled
timesteps, rescaled timesteps and respaced sampling.

With a learned variance the network outputs (eps, v), 2C channels; v in [-1, 1] interpolates the log
variance of p(x_{t-1} | x_t) between the posterior's and beta_t (IDDPM eq. 15):
log Sigma = (v + 1) / 2 log beta_t + (1 - v) / 2 log beta~_t. The hybrid loss is
L_simple + lambda L_vlb (eq. 16) with lambda = 0.001 and L_vlb = T E_t[L_t], so per sample
mse + 0.001 T L_t, where L_t (in bits) is the KL between the true and the model posterior (t > 0) or the
decoder's negative log-likelihood (t = 0), computed with the mean's gradient stopped (sec. 3.1).
The network is fed t * 1000 / T (IDDPM's rescaled timesteps) while TimeLoRA tables get the integer step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as torch_dist
from tqdm.auto import tqdm

from condlora.conditions import Conditions
from condlora.diffusion.process import DDPM, Network, UniformTimestepSampler
from condlora.diffusion.samplers import PerSampleNoise, ddim_sample, respaced_timesteps
from condlora.diffusion.schedules import NoiseSchedule, gather

if TYPE_CHECKING:
    from condlora.config import SampleConfig
    from condlora.diffusion.guidance import Denoiser


# likelihood terms ------------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x0) under N(mean, e^(2 log_scale)) discretised into the 256 bins of an 8-bit image in [-1, 1]
    (Ho et al. eq. 13): the mass of [x - 1/255, x + 1/255], the outer bins extended to -inf / +inf. Exact
    normal CDF (the published code uses a tanh approximation, within 2e-4 of it). Elementwise, in nats."""
    centered, inv_std = x0 - mean, torch.exp(-log_scale)
    upper, lower = inv_std * (centered + 1 / 255), inv_std * (centered - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # x = -1: the whole left tail
    log_sf_lower = torch.special.log_ndtr(-lower)  # x = +1: the whole right tail
    log_mass = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x0 < -0.999, log_cdf_upper, torch.where(x0 > 0.999, log_sf_lower, log_mass))


# a (possibly respaced) chain of steps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """The reverse process over `steps` (increasing indices of the training schedule), with the betas of the
    respaced chain beta_i = 1 - ab[s_i] / ab[s_{i-1}] (IDDPM sec. 4). All per-step tensors are (K,) float64.

    With every step of the schedule it is the training process itself.
    """

    steps: tuple[int, ...]
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    betas: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance: torch.Tensor  # clipped: step 0's (zero) variance replaced by step 1's

    @classmethod
    def of(cls, schedule: NoiseSchedule, steps: Sequence[int] | None = None) -> Chain:
        """The chain over `steps` of `schedule` (default: all of them)."""
        steps = tuple(sorted(steps)) if steps is not None else tuple(range(schedule.num_timesteps))
        ab = schedule.alphas_cumprod[list(steps)]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        betas = 1 - ab / ab_prev
        var = betas * (1 - ab_prev) / (1 - ab)
        clipped = torch.cat([var[1:2], var[1:]]) if len(steps) > 1 else betas
        return cls(steps, ab, ab_prev, betas, var, clipped.log())

    def to(self, device: torch.device | str) -> Chain:
        """The chain with its tables on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if f.name != "steps"}
        return dataclasses.replace(self, **moved)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(x_{i-1} | x_i, x_0) (Ho et al. eq. 7) at chain positions `index`."""
        ab, ab_prev, beta = (gather(v, index, x_t) for v in (self.alphas_cumprod, self.alphas_cumprod_prev, self.betas))
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x_t
        return mean, gather(self.posterior_log_variance, index, x_t)

    def model_step(
        self,
        output: torch.Tensor,
        x_t: torch.Tensor,
        index: torch.Tensor,
        learn_sigma: bool,
        clip_denoised: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(x_{i-1} | x_i) from the network's output: (mean, log variance, predicted x0).

        Args:
            output: (B, C, ...) eps, or (B, 2C, ...) eps and v with a learned variance.
            x_t: (B, C, ...) the current sample.
            index: (B,) positions in this chain.
            learn_sigma: read v from the output; otherwise the variance is the posterior's (beta~).
            clip_denoised: clamp the predicted x0 to [-1, 1] (sampling; the loss does not clip).
        """
        channels = x_t.shape[1]
        eps = output[:, :channels]
        ab = gather(self.alphas_cumprod, index, x_t)
        x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()  # invert q(x_t | x_0) (Ho et al. eq. 4)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, min_log = self.posterior(x0, x_t, index)
        if not learn_sigma:
            return mean, min_log, x0
        frac = (output[:, channels:] + 1) / 2  # v in [-1, 1] -> [0, 1]
        max_log = gather(self.betas.log(), index, x_t)
        return mean, frac * max_log + (1 - frac) * min_log, x0  # IDDPM eq. 15


# importance sampling of timesteps --------------------------------------------------------------------------------


class LossSecondMomentSampler:
    """IDDPM's importance sampling of t (sec. 3.3): p_t proportional to sqrt(E[L_t^2]) over the last `history`
    losses of each step, mixed with `uniform` of the uniform distribution; uniform until every step has
    `history` losses. Each drawn sample is weighted 1 / (T p_t) so the loss stays unbiased.

    The histories live in tensors on the training device and are updated without host synchronisation;
    under DDP every rank gathers all ranks' losses, so the histories (and the checkpoint) agree.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform: float = 0.001):
        self.num_timesteps, self.history, self.uniform = num_timesteps, history, uniform
        self.losses = torch.zeros(num_timesteps + 1, history, dtype=torch.float64)  # last row: scratch for overflow
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def probabilities(self) -> torch.Tensor:
        """(T,) p_t."""
        T = self.num_timesteps
        rms = self.losses[:T].pow(2).mean(dim=1).sqrt()
        p = rms / rms.sum().clamp(min=1e-300) * (1 - self.uniform) + self.uniform / T
        warm = (self.counts >= self.history).all()
        return torch.where(warm, p, torch.full_like(p, 1 / T))

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B,) int64, weights (B,) float32), on the generator's device."""
        self._to(generator.device)
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1 / (self.num_timesteps * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the (unweighted) per-sample losses of steps t (gathered from every rank under DDP). A batch
        with a non-finite loss is not recorded (the training step skips it too): one would poison every p_t."""
        t, losses = t.detach(), losses.detach().to(torch.float64)
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            t, losses = _all_gather(t), _all_gather(losses)
        self._to(t.device)
        order = torch.sort(t, stable=True).indices
        t, losses = t[order], losses[order]
        first = torch.searchsorted(t, t)
        rank = torch.arange(len(t), device=t.device) - first  # position among equal steps
        seen = torch.searchsorted(t, t, right=True) - first  # how often each sample's step occurs (no bincount:
        # on a GPU it reads the range of t on the host)
        slot = (self.counts[t] + rank) % self.history  # ring buffer: overwrite the oldest
        finite = torch.isfinite(losses).all()  # a non-finite step is skipped, as the optimizer skips it
        keep = (rank >= seen - self.history) & finite  # the last `history` writes only
        self.losses[torch.where(keep, t, self.num_timesteps), slot] = losses
        self.counts.index_add_(0, t, finite.long().expand_as(t))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses, "counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["losses"].shape != self.losses.shape or state["counts"].shape != self.counts.shape:
            raise ValueError(
                f"timestep sampler state of shape {tuple(state['losses'].shape)} does not fit T = {self.num_timesteps}"
            )
        device = self.losses.device
        self.losses, self.counts = state["losses"].to(device, torch.float64), state["counts"].to(device, torch.long)

    def _to(self, device: torch.device) -> None:
        if self.losses.device != device:
            self.losses, self.counts = self.losses.to(device), self.counts.to(device)


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, x)
    return torch.cat(parts)


# the process ----------------------------------------------------------------------------------------------------


class IDDPM(DDPM):
    """The IDDPM family: DDPM's discrete steps with the network fed t * 1000 / T, an optional learned variance
    with the hybrid loss, and uniform or importance-sampled timesteps.

    Args:
        schedule: the noise schedule (cosine in the papers).
        learn_sigma: the network outputs (eps, v) and the loss adds vlb_weight * T * L_t.
        vlb_weight: lambda of the hybrid loss (0.001).
        timestep_sampler: `UniformTimestepSampler` (default) or `LossSecondMomentSampler`.
    """

    family = "iddpm"

    def __init__(
        self,
        schedule: NoiseSchedule,
        learn_sigma: bool = True,
        vlb_weight: float = 0.001,
        timestep_sampler: UniformTimestepSampler | LossSecondMomentSampler | None = None,
    ):
        super().__init__(schedule)
        self.learn_sigma, self.vlb_weight = learn_sigma, vlb_weight
        self.timestep_sampler = timestep_sampler or UniformTimestepSampler(schedule.num_timesteps)
        self.chain = Chain.of(schedule)

    def to(self, device: torch.device | str) -> IDDPM:
        """Move the schedule, the training chain and the importance sampler's histories to `device` (in place)."""
        super().to(device)
        self.chain = self.chain.to(device)
        if isinstance(self.timestep_sampler, LossSecondMomentSampler):
            self.timestep_sampler._to(torch.device(device))
        return self

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """IDDPM's rescaled timestep t * 1000 / T, float32."""
        return t.float() * (1000.0 / self.num_timesteps)

    def terms(
        self,
        output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms of one network output: {"mse": L_simple, "vb": L_t in bits (learned variance
        only; the mean's gradient stopped), "loss": mse + vlb_weight * T * vb}, each (B,).

        Args:
            output: (B, C or 2C, ...) the network's output at (x_t, t).
            x0, x_t, noise: (B, C, ...) the clean images, the noisy ones and the noise that made them.
            t: (B,) int64 steps.
        """
        precision = torch.promote_types(output.dtype, torch.float32)  # bf16 outputs: reduce in float32
        output, x0, x_t, noise = (v.to(precision) for v in (output, x0, x_t, noise))
        channels = x0.shape[1]
        mse = (output[:, :channels] - noise).pow(2).flatten(1).mean(dim=1)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse}
        frozen = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
        mean, log_var, _ = self.chain.model_step(frozen, x_t, t, learn_sigma=True, clip_denoised=False)
        true_mean, true_log_var = self.chain.posterior(x0, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"loss": mse + self.vlb_weight * self.num_timesteps * vb, "mse": mse, "vb": vb}

    def loss(
        self,
        net: Network,
        x0: torch.Tensor,
        cond: Conditions,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """The hybrid loss of a batch, per sample; "loss" is importance-weighted when t is importance-sampled
        (the logged "mse" and "vb" are not)."""
        sampler = self.timestep_sampler
        if isinstance(sampler, LossSecondMomentSampler):
            t, weights = sampler.sample(x0.shape[0], generator)
        else:
            t, weights = sampler.sample(x0.shape[0], generator), None
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        terms = self.terms(self.predict(net, x_t, t, cond), x0, x_t, t, noise)
        if weights is not None:
            sampler.update(t, terms["loss"])
            terms["loss"] = terms["loss"] * weights
        return terms

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps for an exact resume: the importance sampler's loss histories, if any."""
        sampler = self.timestep_sampler
        return sampler.state_dict() if isinstance(sampler, LossSecondMomentSampler) else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if isinstance(self.timestep_sampler, LossSecondMomentSampler):
            self.timestep_sampler.load_state_dict(state)

    def sample(
        self,
        denoise: Denoiser,
        noise: PerSampleNoise,
        shape: Sequence[int],
        sample: SampleConfig,
        progress: bool = False,
    ) -> torch.Tensor:
        """Ancestral sampling respaced to `sample.steps` steps with the learned variance (sampler ddpm), or
        DDIM on the eps channels (sampler ddim)."""
        if sample.sampler == "ddim":
            channels = shape[0]
            eps = lambda x, t: denoise(x, t)[:, :channels]  # noqa: E731
            return ddim_sample(eps, self.schedule, noise, shape, sample.steps, sample.eta, progress=progress)
        if sample.sampler != "ddpm":
            raise ValueError(f"the iddpm family samples with ddpm or ddim, not {sample.sampler!r}")
        chain = Chain.of(self.schedule, respaced_timesteps(self.num_timesteps, sample.steps))
        return iddpm_sample(denoise, chain, noise, shape, self.learn_sigma, progress=progress)


@torch.no_grad()
def iddpm_sample(
    denoise: Denoiser,
    chain: Chain,
    noise: PerSampleNoise,
    shape: Sequence[int],
    learn_sigma: bool,
    clip_denoised: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling along `chain` (IDDPM's respaced p_sample_loop): x_{i-1} = mean + exp(log_var / 2) z.

    Args:
        denoise: the guided network output D(x, t), (B, C or 2C, ...), t the training step (B,) int64.
        chain: the steps to take (`Chain.of(schedule, steps)`).
        noise: per-sample noise (also the batch size).
        shape: (C, H, W) of one image.
        learn_sigma: read the variance from the output's second half (guided outputs mix it with the
            guidance weights; it is clamped to [-1, 1], so the variance stays between beta~ and beta).
        clip_denoised: clamp the predicted x0 to [-1, 1].
        progress: show a progress bar.
    Returns:
        (B, C, H, W) samples, float32.
    """
    x = noise.randn(shape)
    batch = x.shape[0]
    channels = shape[0]
    chain = chain.to(x.device)  # its tables are read at every step
    for i in tqdm(reversed(range(len(chain.steps))), total=len(chain.steps), disable=not progress, leave=False):
        t = torch.full((batch,), chain.steps[i], dtype=torch.long, device=x.device)
        output = denoise(x, t)
        if learn_sigma:
            output = torch.cat([output[:, :channels], output[:, channels:].clamp(-1, 1)], dim=1)
        index = torch.full((batch,), i, dtype=torch.long, device=x.device)
        mean, log_var, _ = chain.model_step(output.to(x.dtype), x, index, learn_sigma, clip_denoised)
        x = mean + (0.5 * log_var).exp() * noise.randn(shape) if i > 0 else mean
    return x
