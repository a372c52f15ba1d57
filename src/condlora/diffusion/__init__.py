"""The diffusion layer: schedules, losses, samplers and guidance. Networks never see a schedule."""

from condlora.diffusion.guidance import classifier_free_guidance, conditioned
from condlora.diffusion.losses import EpsilonLoss, UniformTimestepSampler
from condlora.diffusion.samplers import PerSampleNoise, ddim_sample, ddpm_sample, respaced_timesteps
from condlora.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas, schedule_for

__all__ = [
    "EpsilonLoss",
    "NoiseSchedule",
    "PerSampleNoise",
    "UniformTimestepSampler",
    "classifier_free_guidance",
    "conditioned",
    "cosine_betas",
    "ddim_sample",
    "ddpm_sample",
    "linear_betas",
    "respaced_timesteps",
    "schedule_for",
]
