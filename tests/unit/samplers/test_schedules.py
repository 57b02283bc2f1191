"""Sigma schedules: value-for-value equal to diffusers' ``set_timesteps``, plus properties."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.domain.samplers import (
    flow_euler_sigmas,
    flow_euler_timesteps,
    flow_sigmas,
    flow_timesteps,
    karras_sigmas,
    sigma_list,
)

STEPS = [1, 2, 5, 10, 25, 50, 1000]
SHIFTS = [1.0, 3.0, 5.0, 7.3, 0.5]


def _unipc(n: int, shift: float) -> UniPCMultistepScheduler:
    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    scheduler.set_timesteps(n)
    return scheduler


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_sigmas_equal_diffusers_unipc(n: int, shift: float) -> None:
    scheduler = _unipc(n, shift)
    assert torch.equal(flow_sigmas(n, shift=shift), scheduler.sigmas)
    assert torch.equal(flow_timesteps(n, shift=shift), scheduler.timesteps)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_euler_sigmas_equal_diffusers_flow_match_euler(n: int, shift: float) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(n)
    assert torch.equal(flow_euler_sigmas(n, shift=shift), scheduler.sigmas)
    assert flow_euler_timesteps(n, shift=shift).dtype == scheduler.timesteps.dtype == torch.float32
    assert torch.equal(flow_euler_timesteps(n, shift=shift), scheduler.timesteps)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(("sigma_min", "sigma_max", "rho"), [(0.002, 80.0, 7.0), (0.01, 20.0, 5.0), (0.3, 1.5, 3.0)])
def test_karras_sigmas_equal_diffusers_edm_euler(n: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    scheduler = EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    scheduler.set_timesteps(n)
    assert torch.equal(karras_sigmas(n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho), scheduler.sigmas)


def test_karras_end_points_and_closed_form() -> None:
    sigmas = karras_sigmas(4, sigma_min=0.002, sigma_max=80.0, rho=7.0).double()
    ramp = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0], dtype=torch.float64)
    expected = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas[:-1], expected, rtol=1e-7, atol=0)
    assert sigmas[-1] == 0


def test_flow_sigmas_start_below_one_and_shift_first_levels() -> None:
    sigmas = flow_sigmas(4, shift=3.0).double()
    assert sigmas[0] == pytest.approx(1 - 1e-6, abs=1e-7)
    u = 1 - 1 * (1 - 1e-3) / 4
    assert sigmas[1] == pytest.approx(3 * u / (1 + 2 * u), rel=1e-7)
    assert sigmas[-1] == 0


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), shift=st.floats(0.2, 20.0))
def test_flow_schedules_are_valid(n: int, shift: float) -> None:
    # diffusers' FlowMatchEuler rounds its first level in float32: 1 + 6e-7 for shift < 1 (reproduced as is).
    for sigmas, top in ((flow_sigmas(n, shift=shift), 1.0), (flow_euler_sigmas(n, shift=shift), 1.0 + 1e-6)):
        levels = sigma_list(sigmas)
        assert len(levels) == n + 1 and levels[-1] == 0.0
        assert all(0.0 < s < top for s in levels[:-1])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    sigma_min=st.floats(1e-3, 1.0),
    ratio=st.floats(2.0, 1e5),
    rho=st.floats(1.0, 10.0),
)
def test_karras_schedule_is_valid(n: int, sigma_min: float, ratio: float, rho: float) -> None:
    sigma_max = sigma_min * ratio
    levels = sigma_list(karras_sigmas(n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho))
    assert len(levels) == n + 1 and levels[-1] == 0.0
    assert math.isclose(levels[0], sigma_max, rel_tol=1e-6)
    if n > 1:
        assert math.isclose(levels[-2], sigma_min, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("sigmas", "match"),
    [
        ([1.0], "at least two"),
        ([1.0, 1.0, 0.0], "strictly decreasing"),
        ([0.5, 0.7, 0.0], "strictly decreasing"),
        ([1.0, -0.1], "non-negative"),
        ([float("nan"), 0.0], "finite"),
        (torch.ones(2, 2), "1-D"),
    ],
)
def test_sigma_list_rejects_invalid_levels(sigmas: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sigma_list(sigmas)  # type: ignore[arg-type]


def test_schedules_reject_zero_steps() -> None:
    for schedule in (karras_sigmas, flow_sigmas, flow_euler_sigmas):
        with pytest.raises(ValueError, match="at least 1"):
            schedule(0)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, sigma_min=2.0, sigma_max=1.0)
