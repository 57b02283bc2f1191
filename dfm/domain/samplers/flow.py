"""Euler sampler for flow-matching models (Lipman et al., "Flow Matching for Generative Modeling", 2023;
Esser et al., "Scaling Rectified Flow Transformers", 2024).

With ``x_sigma = (1 - sigma) x0 + sigma eps`` the network predicts the velocity ``v = eps - x0``,
and ``dx/dsigma = v`` is integrated from ``sigma = 1`` (noise) down to ``sigma = 0`` (data).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dfm.domain.samplers.schedules import Denoiser, StepCallback, sigma_list


def sample_flow_euler(
    velocity: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Explicit Euler on the flow ODE: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i)``.

    With :func:`flow_euler_sigmas` this equals ``diffusers.FlowMatchEulerDiscreteScheduler``.

    Args:
        velocity: ``v(x, sigma) -> eps - x0``, the flow network at one level for the whole batch.
        x: Initial state at ``sigmas[0]`` (pure noise when ``sigmas[0] = 1``); its dtype is kept.
        sigmas: Strictly decreasing levels in ``[0, 1]``, e.g. :func:`flow_sigmas`.
        generator: Unused (the sampler is deterministic); accepted for the common sampler signature.
        callback: Called after every step (see :class:`StepCallback`).

    Returns:
        The state at ``sigmas[-1]``.
    """
    del generator
    levels = sigma_list(sigmas)
    steps = len(levels) - 1
    for i in range(steps):
        x = x + (levels[i + 1] - levels[i]) * velocity(x, levels[i])
        if callback is not None:
            callback(i, steps, x)
    return x


def denoised_from_velocity(x: torch.Tensor, sigma: float, v: torch.Tensor) -> torch.Tensor:
    """The data prediction of a velocity: ``x0_hat = x - sigma v`` (since ``x = x0 + sigma (eps - x0)``)."""
    return x - sigma * v
