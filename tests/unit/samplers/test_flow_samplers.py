"""Flow Euler against diffusers' FlowMatchEulerDiscreteScheduler and the exact Gaussian flow."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from support.errors import max_rel
from support.oracles import SHAPE, GaussianFlow

from dfm.domain.diffusion.flow import shift_sigma
from dfm.domain.samplers import flow_euler_sigmas, sample_flow_euler


def _diffusers_trajectory(velocity: GaussianFlow, x: torch.Tensor, n: int, shift: float) -> list[torch.Tensor]:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(n)
    states = []
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(x, float(scheduler.sigmas[i]))
        x = scheduler.step(v, t, x).prev_sample
        states.append(x)
    return states


@pytest.mark.parametrize("shift", [3.0, 5.0])
@pytest.mark.parametrize("n", [10, 30])
def test_flow_euler_matches_diffusers_every_step(n: int, shift: float) -> None:
    velocity = GaussianFlow()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    expected = _diffusers_trajectory(velocity, x.clone(), n, shift)
    states: list[torch.Tensor] = []
    calls: list[tuple[int, int]] = []

    def record(i: int, total: int, state: torch.Tensor) -> None:
        calls.append((i, total))
        states.append(state)

    out = sample_flow_euler(velocity, x.clone(), flow_euler_sigmas(n, shift=shift), callback=record)
    assert calls == [(i, n) for i in range(n)]
    assert out is states[-1] and out.dtype == x.dtype
    assert max(max_rel(a, b) for a, b in zip(states, expected, strict=True)) <= 1e-5


def test_flow_euler_converges_at_first_order_to_the_exact_flow() -> None:
    velocity = GaussianFlow(seed=3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    errors = []
    for n in (16, 32, 64, 128):
        sigmas = shift_sigma(torch.linspace(1.0, 0.1, n + 1, dtype=torch.float64), 3.0)
        out = sample_flow_euler(velocity, x, sigmas)
        errors.append(max_rel(out, velocity.transport(x, float(sigmas[0]), float(sigmas[-1]))))
    orders = [math.log2(errors[k] / errors[k + 1]) for k in range(3)]
    assert all(0.9 <= p <= 1.1 for p in orders), (errors, orders)


def test_flow_euler_single_step_to_zero_returns_the_data_prediction() -> None:
    velocity = GaussianFlow()
    x = torch.randn(SHAPE, dtype=torch.float64)
    out = sample_flow_euler(velocity, x, [0.7, 0.0])
    torch.testing.assert_close(out, x - 0.7 * velocity(x, 0.7))
