"""From noise to latents: a network, its diffusion process and a named sampler, with guidance.

Flow models sample from ``x_1 = eps`` along ``sigma`` in [1, 0]; EDM models from
``x = sigma_max eps`` along the Karras schedule. Text conditioning uses classifier-free guidance
with the conditional and unconditional passes in one batched forward.
"""

from __future__ import annotations

from typing import Literal

import torch

from dfm.domain.diffusion.conditioning import DenoiserNetwork
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.samplers.edm import sample_edm_euler, sample_edm_heun
from dfm.domain.samplers.flow import sample_flow_euler
from dfm.domain.samplers.guidance import TextModel, guided
from dfm.domain.samplers.schedules import StepCallback, flow_euler_sigmas, flow_sigmas, karras_sigmas
from dfm.domain.samplers.unipc import sample_flow_unipc

SamplerName = Literal["unipc", "flow_euler", "edm_euler", "edm_heun"]


def _per_sample(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def flow_velocity_model(network: DenoiserNetwork, process: FlowMatching) -> TextModel:
    """``(x, sigma, text, mask) -> v``: the network at ``t = sigma * num_train_timesteps``."""

    def model(
        x: torch.Tensor, sigma: float | torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        t = _per_sample(sigma, x) * process.num_train_timesteps
        return network(x, t, text, mask).to(x.dtype)

    return model


def edm_denoiser_model(network: DenoiserNetwork, process: EDM) -> TextModel:
    """``(x, sigma, text, mask) -> D(x; sigma)``: the preconditioned EDM denoiser."""

    def model(
        x: torch.Tensor, sigma: float | torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return process.denoise(network, x, _per_sample(sigma, x), text, mask)

    return model


def sample_latents(
    network: DenoiserNetwork,
    process: FlowMatching | EDM,
    noise: torch.Tensor,
    *,
    sampler: SamplerName,
    steps: int,
    guidance: float,
    text: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    null_text: torch.Tensor | None = None,
    null_text_mask: torch.Tensor | None = None,
    shift: float | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise standard-normal ``noise`` ``[B, C, F, H, W]`` into latents with the named sampler.

    ``null_text`` (default: zeros, as in training-time text dropout) is the unconditional input;
    ``guidance`` 1 runs the conditional pass only. ``shift`` overrides the flow process's shift.
    """
    if null_text is None:  # the null text of training-time dropout: zeros under the same mask
        null_text, null_text_mask = torch.zeros_like(text), text_mask
    texts = {"text": text, "text_mask": text_mask, "null_text": null_text, "null_text_mask": null_text_mask}
    if isinstance(process, FlowMatching):
        if sampler not in ("unipc", "flow_euler"):
            raise ValueError(f"sampler {sampler!r} does not fit a flow-matching model; use unipc or flow_euler")
        velocity = guided(flow_velocity_model(network, process), scale=guidance, **texts)
        s = process.shift if shift is None else shift
        if sampler == "unipc":
            return sample_flow_unipc(velocity, noise, flow_sigmas(steps, shift=s), callback=callback)
        return sample_flow_euler(velocity, noise, flow_euler_sigmas(steps, shift=s), callback=callback)
    if sampler not in ("edm_euler", "edm_heun"):
        raise ValueError(f"sampler {sampler!r} does not fit an EDM model; use edm_euler or edm_heun")
    denoise = guided(edm_denoiser_model(network, process), scale=guidance, **texts)
    sigmas = karras_sigmas(steps, sigma_min=process.sigma_min, sigma_max=process.sigma_max, rho=process.rho)
    solver = sample_edm_heun if sampler == "edm_heun" else sample_edm_euler
    return solver(denoise, noise * sigmas[0], sigmas, generator=generator, callback=callback)
