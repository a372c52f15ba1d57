"""The diffusion layer: processes (losses, what the network is fed), samplers and guidance.

Networks never see a schedule."""

from condlora.diffusion.guidance import Guidance, classifier_free, guided, null_condition
from condlora.diffusion.process import DDPM, UniformTimestepSampler, process_for
from condlora.diffusion.samplers import PerSampleNoise, ddim_sample, ddpm_sample, respaced_timesteps
from condlora.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas, schedule_for

__all__ = [
    "DDPM",
    "Guidance",
    "NoiseSchedule",
    "PerSampleNoise",
    "UniformTimestepSampler",
    "classifier_free",
    "cosine_betas",
    "ddim_sample",
    "ddpm_sample",
    "guided",
    "linear_betas",
    "null_condition",
    "process_for",
    "respaced_timesteps",
    "schedule_for",
]
