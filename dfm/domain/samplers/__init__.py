"""Samplers: small free functions ``sample_<solver>(denoise, x, sigmas, *, generator, callback)``.

EDM Euler/Heun (Karras et al. 2022), flow Euler, UniPC for flow models (Zhao et al. 2023) and
classifier-free guidance; schedules that reproduce diffusers' ``set_timesteps`` exactly. Pure: the
only randomness is an injected generator and progress is reported through a callback.
"""

from dfm.domain.samplers.edm import randn_like, sample_edm_euler, sample_edm_heun
from dfm.domain.samplers.flow import denoised_from_velocity, sample_flow_euler
from dfm.domain.samplers.guidance import TextModel, guided
from dfm.domain.samplers.schedules import (
    Denoiser,
    StepCallback,
    flow_euler_sigmas,
    flow_euler_timesteps,
    flow_sigmas,
    flow_timesteps,
    karras_sigmas,
    sigma_list,
)
from dfm.domain.samplers.unipc import sample_flow_unipc

__all__ = [
    "Denoiser",
    "StepCallback",
    "TextModel",
    "denoised_from_velocity",
    "flow_euler_sigmas",
    "flow_euler_timesteps",
    "flow_sigmas",
    "flow_timesteps",
    "guided",
    "karras_sigmas",
    "randn_like",
    "sample_edm_euler",
    "sample_edm_heun",
    "sample_flow_euler",
    "sample_flow_unipc",
    "sigma_list",
]
