"""UniPC for flow-matching models (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models", NeurIPS 2023), WAN 2.1's default sampler.

Notation. A flow model has ``alpha = 1 - sigma`` and log-SNR ``lambda = log(alpha / sigma)``. The
network is evaluated once per step; its velocity becomes a data prediction ``m = x - sigma v``. One
step from level ``s`` (data prediction ``m_0``) to level ``t`` with ``h = lambda_t - lambda_s > 0``,
earlier evaluations ``m_k`` at ``lambda_{s_k}`` and ``r_k = (lambda_{s_k} - lambda_s) / h`` reads
(the data-prediction form of the paper's Algorithms 1-2, so its ``phi`` functions take ``-h``)::

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m_0 - alpha_t B(h) sum_k rho_k (m_k - m_0) / r_k

with ``B(h) = -h`` ("bh1") or ``e^{-h} - 1`` ("bh2") and ``rho`` solving the Vandermonde system
``sum_k rho_k r_k^(j-1) = g_j = j! (-h) phi_{j+1}(-h) / B(h)`` for ``j = 1..K``. The predictor UniP-p
uses the ``p - 1`` previous evaluations; the corrector UniC-p re-does the last step once the network
has been evaluated at its result, adding that evaluation as the node with ``r = 1`` (order ``p + 1``
at no extra network call). As in the reference implementation (and diffusers), a 1x1 system takes
``rho = 1/2`` instead of ``g_1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import attrs
import torch

from dfm.domain.samplers.flow import denoised_from_velocity
from dfm.domain.samplers.schedules import Denoiser, StepCallback, sigma_list

SolverType = Literal["bh1", "bh2"]


@attrs.frozen
class _Node:
    """A level where the network was evaluated: its log-SNR ``lam`` and data prediction ``m``."""

    lam: float
    m: torch.Tensor


def sample_flow_unipc(
    velocity: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    order: int = 2,
    solver_type: SolverType = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Multistep UniPC (UniP-p predictor + UniC corrector) on a flow model; one network call per step.

    With :func:`flow_sigmas` and the defaults this reproduces ``diffusers.UniPCMultistepScheduler(
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)``, WAN 2.1's sampler.
    The first steps warm up with lower orders; the step to ``sigma = 0`` is always first order
    (it returns the last data prediction; a higher order is undefined there, diffusers gives NaN).

    Args:
        velocity: ``v(x, sigma) -> eps - x0``, the flow network at one level for the whole batch.
        x: Initial state at ``sigmas[0]``; its dtype is kept throughout.
        sigmas: Strictly decreasing levels, all in ``(0, 1)`` except a final 0, e.g. :func:`flow_sigmas`.
        order: Predictor order ``p`` (1 to 3); 2 is recommended for guided sampling.
        solver_type: ``B(h)``: ``"bh2"`` (``e^{-h} - 1``, the default) or ``"bh1"`` (``-h``).
        lower_order_final: Cap the order at the number of remaining steps (stabilizes few-step runs).
        disable_corrector: Steps ``i`` whose predicted state is not corrected at step ``i + 1``.
        generator: Unused (the sampler is deterministic); accepted for the common sampler signature.
        callback: Called after every step (see :class:`StepCallback`) with the predicted state.

    Returns:
        The state at ``sigmas[-1]``.
    """
    del generator
    levels = _unipc_levels(sigmas, order, solver_type)
    steps = len(levels) - 1
    nodes: list[_Node] = []
    x_prev, order_prev = x, 0
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        m = denoised_from_velocity(x, sigma, velocity(x, sigma))
        if i > 0 and (i - 1) not in disable_corrector:
            x = _bh_update(x_prev, levels[i - 1], sigma, nodes, order_prev, solver_type, m_new=m)
        nodes = [*nodes, _Node(_log_snr(sigma), m)][-order:]
        order_now = _step_order(i, steps, order, lower_order_final=lower_order_final, final=sigma_next == 0.0)
        x_prev, order_prev = x, order_now
        x = _bh_update(x, sigma, sigma_next, nodes, order_now, solver_type)
        if callback is not None:
            callback(i, steps, x)
    return x


def _bh_update(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    nodes: list[_Node],
    order: int,
    solver_type: SolverType,
    m_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniP-``order`` step from ``sigma`` to ``sigma_next``, or UniC-``order`` when ``m_new`` is given.

    ``nodes[-1]`` is the evaluation at ``sigma`` and ``nodes[-1 - k]`` the earlier ones; ``m_new`` is the
    data prediction at the predicted state at ``sigma_next``.
    """
    m0 = nodes[-1].m
    if sigma_next == 0.0:
        assert order == 1 and m_new is None, "the step to sigma = 0 is a first-order prediction"
        return m0
    alpha_next = 1.0 - sigma_next
    h = _log_snr(sigma_next) - nodes[-1].lam
    expm1_neg_h, B_h, g = _bh_coefficients(h, order, solver_type)
    x_next = (sigma_next / sigma) * x - (alpha_next * expm1_neg_h) * m0
    r = [(node.lam - nodes[-1].lam) / h for node in reversed(nodes[-order:-1])]
    diffs = [(node.m - m0) / r_k for node, r_k in zip(reversed(nodes[-order:-1]), r, strict=True)]
    if m_new is not None:
        r.append(1.0)
        diffs.append(m_new - m0)
    if not r:
        return x_next
    rho = _rho(r, g)
    residual = sum((rho_k * d for rho_k, d in zip(rho, diffs, strict=True)), torch.zeros_like(m0))
    return x_next - (alpha_next * B_h) * residual


def _step_order(i: int, steps: int, order: int, *, lower_order_final: bool, final: bool) -> int:
    """The predictor order of step ``i``: warm-up ``i + 1``, optionally the remaining steps, 1 into ``sigma = 0``."""
    if final:
        return 1
    return min(order, i + 1, steps - i) if lower_order_final else min(order, i + 1)


def _bh_coefficients(h: float, order: int, solver_type: SolverType) -> tuple[float, float, list[float]]:
    """``e^{-h} - 1``, ``B(h)`` and ``g_j = j! (-h) phi_{j+1}(-h) / B(h)`` for ``j = 1..order``.

    Uses ``z phi_{j+1}(z) = phi_j(z) - 1/j!`` with ``phi_0(z) = e^z``, ``z = -h``.
    """
    z = -h
    expm1_z = math.expm1(z)
    B_h = z if solver_type == "bh1" else expm1_z
    g, z_phi, factorial = [], expm1_z / z - 1.0, 1.0  # z_phi = z phi_2(z)
    for j in range(1, order + 1):
        g.append(z_phi * factorial / B_h)
        factorial *= j + 1
        z_phi = z_phi / z - 1.0 / factorial  # z phi_{j+2}(z)
    return expm1_z, B_h, g


def _rho(r: list[float], g: list[float]) -> list[float]:
    """Solve ``sum_k rho_k r_k^(j-1) = g_j`` (``j = 1..len(r)``); ``[1/2]`` for one unknown."""
    if len(r) == 1:
        return [0.5]
    R = torch.tensor([[r_k**j for r_k in r] for j in range(len(r))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(g[: len(r)], dtype=torch.float64)).tolist()


def _log_snr(sigma: float) -> float:
    """``lambda = log(alpha / sigma)`` with ``alpha = 1 - sigma``."""
    return math.log1p(-sigma) - math.log(sigma)


def _unipc_levels(sigmas: torch.Tensor | Sequence[float], order: int, solver_type: str) -> list[float]:
    """Validate the arguments of :func:`sample_flow_unipc` and return the levels as floats."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"UniPC solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    levels = sigma_list(sigmas)
    if levels[0] >= 1.0:
        raise ValueError(f"UniPC needs flow levels in (0, 1) (a final 0 allowed), got {levels}; see flow_sigmas()")
    return levels
