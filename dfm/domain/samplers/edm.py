"""EDM samplers (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022).

Both integrate the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` over a decreasing
``sigmas`` (Algorithm 2 of the paper), optionally with its stochastic "churn": before step ``i`` the
level is raised to ``sigma_hat = (1 + gamma_i) sigma_i`` by adding fresh noise of variance
``sigma_hat^2 - sigma_i^2``, with ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` when
``S_tmin <= sigma_i <= S_tmax`` and 0 otherwise. The noise comes from the injected generator only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch

from dfm.domain.samplers.schedules import Denoiser, StepCallback, sigma_list

Generators = torch.Generator | Sequence[torch.Generator]
"""One generator for the whole batch, or one per sample (row ``b`` drawn from ``generator[b]``)."""


@attrs.frozen(kw_only=True)
class _Churn:
    s_churn: float = attrs.field(validator=attrs.validators.ge(0.0))
    s_tmin: float
    s_tmax: float
    s_noise: float

    def gamma(self, sigma: float, steps: int) -> float:
        """``gamma_i`` of Algorithm 2."""
        if self.s_churn > 0 and self.s_tmin <= sigma <= self.s_tmax:
            return min(self.s_churn / steps, math.sqrt(2.0) - 1.0)
        return 0.0


def sample_edm_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generators | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """First-order (Euler) EDM sampler: Algorithm 2 of Karras et al. 2022 without the Heun correction.

    ``x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (x_hat - D(x_hat; sigma_hat)) / sigma_hat``; with
    ``s_churn = 0`` this is deterministic and equals ``diffusers.EDMEulerScheduler``.

    Args:
        denoise: ``D(x; sigma) -> x0_hat``, the preconditioned denoiser.
        x: Initial state at ``sigmas[0]`` (e.g. ``sigmas[0] * randn``); its dtype is kept throughout.
        sigmas: Strictly decreasing non-negative levels, e.g. :func:`karras_sigmas`.
        s_churn: ``S_churn``, the total amount of stochasticity; 0 for the deterministic ODE solver.
        s_tmin: ``S_tmin``, churn only at ``sigma_i >= S_tmin``.
        s_tmax: ``S_tmax``, churn only at ``sigma_i <= S_tmax``.
        s_noise: ``S_noise``, scale of the added noise (slightly above 1 in the paper).
        generator: Source of the churn noise; required when ``s_churn > 0``.
        callback: Called after every step (see :class:`StepCallback`).

    Returns:
        The state at ``sigmas[-1]``.
    """
    churn = _Churn(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    return _sample_edm(denoise, x, sigma_list(sigmas), churn, heun=False, generator=generator, callback=callback)


def sample_edm_heun(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generators | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Second-order EDM sampler: Algorithm 2 of Karras et al. 2022 (Heun's method with churn).

    After the Euler step to ``x_{i+1}`` the slope is evaluated again at the new point,
    ``d' = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1}``, and the step is redone with the
    mean slope ``(d + d') / 2``. The correction is skipped when ``sigma_{i+1} = 0`` (the slope is
    undefined there), so ``N`` steps ending at 0 cost ``2N - 1`` denoiser calls.

    Args:
        denoise: ``D(x; sigma) -> x0_hat``, the preconditioned denoiser.
        x: Initial state at ``sigmas[0]``; its dtype is kept throughout.
        sigmas: Strictly decreasing non-negative levels, e.g. :func:`karras_sigmas`.
        s_churn: ``S_churn``; 0 for the deterministic ODE solver.
        s_tmin: ``S_tmin``.
        s_tmax: ``S_tmax``.
        s_noise: ``S_noise``.
        generator: Source of the churn noise; required when ``s_churn > 0``.
        callback: Called after every step (see :class:`StepCallback`).

    Returns:
        The state at ``sigmas[-1]``.
    """
    churn = _Churn(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    return _sample_edm(denoise, x, sigma_list(sigmas), churn, heun=True, generator=generator, callback=callback)


def _sample_edm(
    denoise: Denoiser,
    x: torch.Tensor,
    levels: list[float],
    churn: _Churn,
    *,
    heun: bool,
    generator: Generators | None,
    callback: StepCallback | None,
) -> torch.Tensor:
    """The loop of Algorithm 2 over ``levels`` (validated Python floats)."""
    steps = len(levels) - 1
    if churn.s_churn > 0 and generator is None:
        raise ValueError("s_churn > 0 draws fresh noise: pass a torch.Generator (the domain never uses global RNG)")
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        gamma = churn.gamma(sigma, steps)
        sigma_hat = sigma * (1.0 + gamma)
        if gamma > 0:
            assert generator is not None
            noise = randn_like(x, generator)
            x = x + noise * (churn.s_noise * math.sqrt(sigma_hat**2 - sigma**2))
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if heun and sigma_next > 0:
            d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (0.5 * (d + d_next))
        x = x_next
        if callback is not None:
            callback(i, steps, x)
    return x


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn in float32 on the generator's device.

    With a sequence of generators, row ``b`` comes from ``generator[b]``, so a sample's noise does not
    depend on the batch it is in (DESIGN.md rule 2). The draws do not depend on ``x``'s dtype or device.
    """
    if isinstance(generator, torch.Generator):
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    else:
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]} samples")
        rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        noise = torch.stack([row.to(x.device) for row in rows])
    return noise.to(device=x.device, dtype=x.dtype)
