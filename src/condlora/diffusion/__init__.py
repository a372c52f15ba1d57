"""The diffusion layer: processes (losses, what the network is fed), samplers and guidance.

Networks never see a schedule."""

from condlora.diffusion.edm import EDM, EDMPrecond, heun_sample, karras_sigmas, precondition
from condlora.diffusion.guidance import (
    Guidance,
    autolora,
    classifier_free,
    guided,
    mix,
    null_condition,
    with_lora_scale,
)
from condlora.diffusion.process import DDPM, Process, UniformTimestepSampler, process_for
from condlora.diffusion.samplers import PerSampleNoise, ddim_sample, ddpm_sample, respaced_timesteps
from condlora.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas, schedule_for

__all__ = [
    "DDPM",
    "EDM",
    "EDMPrecond",
    "Process",
    "Guidance",
    "NoiseSchedule",
    "PerSampleNoise",
    "UniformTimestepSampler",
    "autolora",
    "classifier_free",
    "cosine_betas",
    "ddim_sample",
    "ddpm_sample",
    "guided",
    "heun_sample",
    "karras_sigmas",
    "linear_betas",
    "mix",
    "null_condition",
    "precondition",
    "process_for",
    "respaced_timesteps",
    "schedule_for",
    "with_lora_scale",
]
