"""From noise to latents: a network, its diffusion process and a named sampler, with guidance.

Flow models sample from ``x_1 = eps`` along ``sigma`` in [1, 0]; EDM models from
``x = sigma_max eps`` along the Karras schedule. Text conditioning uses classifier-free guidance
with the conditional and unconditional passes in one batched forward.

With the same weights, noise and text embeddings a flow model's latents equal those of diffusers'
``WanPipeline`` with the matching scheduler (``UniPCMultistepScheduler(use_flow_sigmas=True)`` for
``unipc``, ``FlowMatchEulerDiscreteScheduler`` for ``flow_euler``): the same levels ``sigma_i``, the
network at the scheduler's own time of each level (:func:`scheduler_time`) and, with
``mask_text_padding`` off, the zero-padded text attended without a mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from dfm.domain.diffusion.conditioning import DenoiserNetwork, network_text_mask
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.samplers.edm import sample_edm_euler, sample_edm_heun
from dfm.domain.samplers.flow import sample_flow_euler
from dfm.domain.samplers.guidance import TextModel, guided
from dfm.domain.samplers.schedules import (
    StepCallback,
    flow_euler_sigmas,
    flow_euler_timesteps,
    flow_sigmas,
    flow_timesteps,
    karras_sigmas,
    sigma_list,
)
from dfm.domain.samplers.unipc import sample_flow_unipc

SamplerName = Literal["unipc", "flow_euler", "edm_euler", "edm_heun"]
TimeOf = Callable[[float | torch.Tensor], float | torch.Tensor]
"""The network's time input ``t`` of a level ``sigma`` (one float, or one per sample ``[B]``)."""


def _per_sample(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def scheduler_time(sigmas: torch.Tensor, timesteps: torch.Tensor) -> TimeOf:
    """``sigma -> t``: the time ``timesteps[i]`` a diffusers scheduler feeds the network at its level ``sigmas[i]``.

    A table, not a formula: UniPC's ``floor(sigma_i T)`` is taken from the float64 levels, which a
    sampler's float32 ``sigma`` no longer determines (``floor(float32(sigma) T)`` can differ by one).

    Args:
        sigmas: The schedule ``[n + 1]`` the sampler steps along (e.g. :func:`flow_sigmas`).
        timesteps: The scheduler's times ``[n]`` of its first ``n`` levels (e.g. :func:`flow_timesteps`).

    Returns:
        A map of those ``n`` levels (floats, or a tensor of them) to their times.

    Raises:
        ValueError: On a level that is not one of the first ``n`` of ``sigmas``.
    """
    levels = sigma_list(sigmas)
    if timesteps.shape != (len(levels) - 1,):
        raise ValueError(f"need one timestep per step: {len(levels) - 1}, got shape {tuple(timesteps.shape)}")
    table = dict(zip(levels, timesteps.tolist(), strict=False))

    def lookup(sigma: float) -> float:
        if sigma not in table:
            raise ValueError(f"sigma={sigma!r} is not a level of the sampling schedule {levels[:-1]}")
        return table[sigma]

    def time_of(sigma: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
            return torch.tensor([lookup(s) for s in sigma.tolist()], device=sigma.device)
        return lookup(float(sigma))

    return time_of


def flow_velocity_model(network: DenoiserNetwork, process: FlowMatching, time_of: TimeOf | None = None) -> TextModel:
    """``(x, sigma, text, mask) -> v``: the velocity network at the time ``t`` of level ``sigma``.

    ``t = time_of(sigma)`` (e.g. :func:`scheduler_time`), else ``t = sigma * num_train_timesteps``. The
    mask reaches the network only when the process masks the text's padding (``mask_text_padding``).
    """

    def model(
        x: torch.Tensor, sigma: float | torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        t = _per_sample(sigma, x) * process.num_train_timesteps if time_of is None else _per_sample(time_of(sigma), x)
        return network(x, t, text, network_text_mask(mask, process.mask_text_padding)).to(x.dtype)

    return model


def flow_schedule(
    sampler: Literal["unipc", "flow_euler"], steps: int, *, shift: float, num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels ``sigma_i`` ``[steps + 1]`` and network times ``t_i`` ``[steps]`` of a flow sampler.

    ``unipc``: :func:`flow_sigmas` with ``t_i = floor(sigma_i T)`` (``UniPCMultistepScheduler(use_flow_sigmas=
    True)``, WAN 2.1's sampler); ``flow_euler``: :func:`flow_euler_sigmas` with ``t_i = sigma_i T``
    (``FlowMatchEulerDiscreteScheduler``).
    """
    T = num_train_timesteps
    if sampler == "unipc":
        return (
            flow_sigmas(steps, shift=shift, num_train_timesteps=T),
            flow_timesteps(steps, shift=shift, num_train_timesteps=T),
        )
    return (
        flow_euler_sigmas(steps, shift=shift, num_train_timesteps=T),
        flow_euler_timesteps(steps, shift=shift, num_train_timesteps=T),
    )


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
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    cfg_batched: bool = True,
) -> torch.Tensor:
    """Denoise standard-normal ``noise`` ``[B, C, F, H, W]`` into latents with the named sampler.

    ``null_text`` (default: zeros, as in training-time text dropout) is the unconditional input;
    ``guidance`` 1 runs the conditional pass only. ``shift`` overrides the flow process's shift. A flow
    network is evaluated at its scheduler's times (:func:`flow_schedule`); the text masks reach the network
    only when the process masks the text's padding (``mask_text_padding``), as in training. ``cfg_batched``
    runs guidance's two passes as one forward over the doubled batch (else two forwards; see ``guided``).
    """
    if null_text is None:  # the null text of training-time dropout: zeros under the same mask
        null_text, null_text_mask = torch.zeros_like(text), text_mask
    texts = {"text": text, "text_mask": text_mask, "null_text": null_text, "null_text_mask": null_text_mask}
    if isinstance(process, FlowMatching):
        if sampler not in ("unipc", "flow_euler"):
            raise ValueError(f"sampler {sampler!r} does not fit a flow-matching model; use unipc or flow_euler")
        s = process.shift if shift is None else shift
        sigmas, timesteps = flow_schedule(sampler, steps, shift=s, num_train_timesteps=process.num_train_timesteps)
        model = flow_velocity_model(network, process, scheduler_time(sigmas, timesteps))
        velocity = guided(model, scale=guidance, batched=cfg_batched, **texts)
        solver = sample_flow_unipc if sampler == "unipc" else sample_flow_euler
        return solver(velocity, noise, sigmas, callback=callback)
    if sampler not in ("edm_euler", "edm_heun"):
        raise ValueError(f"sampler {sampler!r} does not fit an EDM model; use edm_euler or edm_heun")
    denoise = guided(edm_denoiser_model(network, process), scale=guidance, batched=cfg_batched, **texts)
    sigmas = karras_sigmas(steps, sigma_min=process.sigma_min, sigma_max=process.sigma_max, rho=process.rho)
    solver = sample_edm_heun if sampler == "edm_heun" else sample_edm_euler
    return solver(denoise, noise * sigmas[0], sigmas, generator=generator, callback=callback)
