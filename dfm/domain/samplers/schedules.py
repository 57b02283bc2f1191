"""Sigma schedules and the contract every sampler shares.

A sampler integrates from ``sigmas[0]`` down to ``sigmas[-1]`` (usually ``0``), one step per
consecutive pair, so ``len(sigmas) - 1`` steps. The schedules here reproduce, value for value, the
``sigmas`` that diffusers' schedulers hold after ``set_timesteps(n)``: they are computed in float64
exactly as diffusers computes them and returned as float32, the precision diffusers keeps them in.

References:
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022 (eq. 5).
    Esser et al., "Scaling Rectified Flow Transformers", 2024 (the time shift, eq. 23).
    Wan Team, "Wan: Open and Advanced Large-Scale Video Generative Models", 2025 (flow shift 3 or 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from dfm.domain.diffusion.flow import shift_sigma


class Denoiser(Protocol):
    """A network wrapped for sampling: ``(x, sigma) -> prediction``.

    ``sigma`` is one noise level for the whole batch (a Python float); what the prediction is
    depends on the sampler: ``x0_hat`` for the EDM samplers, the velocity ``eps - x0`` for flow.
    """

    def __call__(self, x: torch.Tensor, sigma: float, /) -> torch.Tensor: ...


class StepCallback(Protocol):
    """Called after every step as ``callback(step_index, total, x)``; drives progress bars outside the domain.

    ``step_index`` counts completed steps from 0 to ``total - 1``; ``x`` is the state after that step.
    """

    def __call__(self, step_index: int, total: int, x: torch.Tensor, /) -> None: ...


def karras_sigmas(n: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The EDM schedule: ``n`` levels from ``sigma_max`` to ``sigma_min`` (Karras et al. 2022, eq. 5), then ``0``.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for
    ``i < n``; equals ``diffusers.EDMEulerScheduler(sigma_min, sigma_max, rho=rho).set_timesteps(n)``.

    Args:
        n: Number of non-zero levels, which is also the number of sampler steps (the last one to 0).
        sigma_min: Smallest non-zero level.
        sigma_max: Largest level, where sampling starts.
        rho: Schedule exponent; 7 in the paper.

    Returns:
        float32 tensor ``[n + 1]``, decreasing, ending in 0.
    """
    _check_steps(n)
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return _append_zero(sigmas)


def flow_sigmas(n: int, *, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The WAN 2.1 flow schedule: ``u`` linear from 1 towards ``1/T``, shifted, then ``0``.

    ``u_i = 1 - i (1 - 1/T) / n`` for ``i < n`` (``T = num_train_timesteps``), ``sigma_i = shift_sigma(u_i,
    shift)``, and ``sigma_0 = 1 - 1e-6`` instead of 1 so that the log-SNR stays finite. Equals
    ``diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(n)``,
    WAN 2.1's default sampler setting (``shift`` 3 for 480p, 5 for 720p).

    Args:
        n: Number of sampler steps.
        shift: Time shift ``s`` (Esser et al. 2024, eq. 23).
        num_train_timesteps: ``T``; the network was trained on ``t = sigma T``.

    Returns:
        float32 tensor ``[n + 1]`` in ``(0, 1)``, decreasing, ending in 0.
    """
    return _append_zero(torch.tensor(_flow_sigmas64(n, shift, num_train_timesteps), dtype=torch.float64))


def flow_timesteps(n: int, *, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The integer network times diffusers pairs with :func:`flow_sigmas`: ``floor(sigma_i T)``, int64 ``[n]``.

    ``UniPCMultistepScheduler(use_flow_sigmas=True)`` (and the WAN 2.1 repository's own UniPC) computes
    ``sigma_i T`` in float64 from the unrounded levels and casts it to int64, so WanPipeline feeds the
    transformer these truncated times, not ``sigma_i T``: level ``sigmas[i]`` is sampled at ``timesteps[i]``.
    """
    sigmas = torch.tensor(_flow_sigmas64(n, shift, num_train_timesteps), dtype=torch.float64)
    return (sigmas * num_train_timesteps).to(torch.int64)


def flow_euler_timesteps(n: int, *, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The network times diffusers pairs with :func:`flow_euler_sigmas`: ``sigma_i T`` in float32, ``[n]``.

    ``FlowMatchEulerDiscreteScheduler`` keeps its levels in float32 and multiplies them by ``T`` there,
    without rounding to an integer: level ``sigmas[i]`` is sampled at ``timesteps[i]``.
    """
    return flow_euler_sigmas(n, shift=shift, num_train_timesteps=num_train_timesteps)[:-1] * num_train_timesteps


def flow_euler_sigmas(n: int, *, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The schedule of ``diffusers.FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n)``.

    It differs from :func:`flow_sigmas`: ``u`` runs linearly over ``n`` points from 1 to
    ``shift_sigma(1/T)`` (computed in float32, both end points included) and is then shifted, so
    the last non-zero level is ``shift_sigma(shift_sigma(1/T))`` — diffusers shifts that end point twice.

    Args:
        n: Number of sampler steps.
        shift: Time shift ``s``.
        num_train_timesteps: ``T``.

    Returns:
        float32 tensor ``[n + 1]``, decreasing from 1, ending in 0.
    """
    _check_steps(n)
    T = num_train_timesteps
    ends = shift_sigma(torch.tensor([T, 1], dtype=torch.float32) / T, shift)
    u = _np_linspace(float(ends[0]) * T, float(ends[1]) * T, n) / T
    return _append_zero(shift_sigma(u, shift))


def sigma_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """Validate a sampler's ``sigmas`` and return them as Python floats (exact for float32/64 input).

    Raises:
        ValueError: unless ``sigmas`` is 1-D with at least two finite levels, strictly decreasing and
            non-negative.
    """
    if isinstance(sigmas, torch.Tensor):
        if sigmas.ndim != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        sigmas = sigmas.tolist()
    levels = [float(s) for s in sigmas]
    if len(levels) < 2:
        raise ValueError(f"sigmas needs at least two levels (one step), got {levels}")
    if not all(math.isfinite(s) and s >= 0.0 for s in levels):
        raise ValueError(f"sigmas must be finite and non-negative, got {levels}")
    if any(levels[i + 1] >= levels[i] for i in range(len(levels) - 1)):
        raise ValueError(f"sigmas must be strictly decreasing, got {levels}")
    return levels


def _flow_sigmas64(n: int, shift: float, num_train_timesteps: int) -> list[float]:
    """The float64 shifted levels of :func:`flow_sigmas` without the final 0."""
    _check_steps(n)
    u = _np_linspace(1.0, 1.0 / num_train_timesteps, n + 1)[:-1]
    sigmas = shift_sigma(u, shift).tolist()
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6
    return sigmas


def _np_linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """``numpy.linspace(start, stop, num)`` in float64, bit for bit (``i * step + start``, last = ``stop``)."""
    step = (stop - start) / (num - 1) if num > 1 else 0.0
    y = torch.arange(num, dtype=torch.float64) * step + start
    if num > 1:
        y[-1] = stop
    return y


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1, dtype=torch.float32)])


def _check_steps(n: int) -> None:
    if n < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
