"""UniPC for flow models against diffusers' UniPCMultistepScheduler (WAN 2.1's sampler config)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from support.errors import max_rel
from support.oracles import SHAPE, GaussianFlow

from dfm.domain.diffusion.flow import shift_sigma
from dfm.domain.samplers import flow_sigmas, sample_flow_euler, sample_flow_unipc


def _diffusers_trajectory(velocity: GaussianFlow, x: torch.Tensor, n: int, **config: object) -> list[torch.Tensor]:
    """The loop of diffusers' WanPipeline around ``UniPCMultistepScheduler``."""
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, **config)
    scheduler.set_timesteps(n)
    scheduler.set_begin_index(0)
    states = []
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, float(scheduler.sigmas[i])), t, x).prev_sample
        states.append(x)
    return states


def _our_trajectory(velocity: GaussianFlow, x: torch.Tensor, n: int, shift: float, **kw: object) -> list[torch.Tensor]:
    states: list[torch.Tensor] = []
    sample_flow_unipc(velocity, x, flow_sigmas(n, shift=shift), callback=lambda i, total, s: states.append(s), **kw)
    return states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift", [3.0, 5.0])
@pytest.mark.parametrize("n", [5, 10, 25])
def test_unipc_matches_diffusers_wan_config(n: int, shift: float, dtype: torch.dtype) -> None:
    """WAN 2.1: flow_prediction, use_flow_sigmas, flow_shift, solver_order=2, bh2, lower_order_final."""
    velocity = GaussianFlow()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    config = {"flow_shift": shift, "solver_order": 2, "solver_type": "bh2", "lower_order_final": True}
    expected = _diffusers_trajectory(velocity, x.clone(), n, **config)
    velocity.calls = 0
    ours = _our_trajectory(velocity, x.clone(), n, shift)
    assert velocity.calls == n  # one network call per step: the corrector reuses the next evaluation
    assert len(ours) == n and ours[-1].dtype == dtype
    assert max(max_rel(a, b) for a, b in zip(ours, expected, strict=True)) <= 1e-5


@pytest.mark.parametrize(
    "options",
    [{"order": 1}, {"order": 3}, {"lower_order_final": False}, {"disable_corrector": (0, 3)}],
)
def test_unipc_other_orders_and_options_match_diffusers(options: dict) -> None:
    n, shift = 10, 3.0
    velocity = GaussianFlow(seed=2)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    config = {
        "flow_shift": shift,
        "solver_order": options.get("order", 2),
        "lower_order_final": options.get("lower_order_final", True),
        "disable_corrector": list(options.get("disable_corrector", [])),
    }
    expected = _diffusers_trajectory(velocity, x.clone(), n, **config)
    ours = _our_trajectory(velocity, x.clone(), n, shift, **options)
    # Without lower_order_final diffusers takes a 2nd/3rd-order step into sigma = 0 and returns NaN;
    # ours steps into 0 at first order, so compare up to the last non-zero level there.
    last = n - 1 if not config["lower_order_final"] else n
    assert max(max_rel(a, b) for a, b in zip(ours[:last], expected[:last], strict=True)) <= 1e-5
    assert torch.isfinite(ours[-1]).all()


def test_unipc_bh1_matches_diffusers_before_its_nan_final_step() -> None:
    n, shift = 10, 5.0
    velocity = GaussianFlow(seed=4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    expected = _diffusers_trajectory(velocity, x.clone(), n, flow_shift=shift, solver_type="bh1")
    ours = _our_trajectory(velocity, x.clone(), n, shift, solver_type="bh1")
    assert max(max_rel(a, b) for a, b in zip(ours[:-1], expected[:-1], strict=True)) <= 1e-5
    assert torch.isnan(expected[-1]).all()  # diffusers: -inf * 0 in B(h) = h at sigma = 0
    assert torch.isfinite(ours[-1]).all()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_converges_at_order_p_plus_one_on_the_exact_flow(order: int) -> None:
    """UniC raises UniP-p to order p + 1 (Zhao et al. 2023, Thm 3.3); observed between 64 and 128 steps."""
    velocity = GaussianFlow(seed=7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    errors = []
    for n in (64, 128):
        sigmas = shift_sigma(torch.linspace(0.9, 0.2, n + 1, dtype=torch.float64), 3.0)
        out = sample_flow_unipc(velocity, x, sigmas, order=order, lower_order_final=False)
        errors.append(max_rel(out, velocity.transport(x, float(sigmas[0]), float(sigmas[-1]))))
    observed = math.log2(errors[0] / errors[1])
    assert order + 0.8 <= observed <= order + 1.3, (errors, observed)
    euler = sample_flow_euler(velocity, x, sigmas)
    assert errors[1] < max_rel(euler, velocity.transport(x, float(sigmas[0]), float(sigmas[-1]))) / 10


def test_unipc_last_step_returns_the_data_prediction() -> None:
    velocity = GaussianFlow()
    x = torch.randn(SHAPE, dtype=torch.float64)
    out = sample_flow_unipc(velocity, x, [0.6, 0.0])
    torch.testing.assert_close(out, x - 0.6 * velocity(x, 0.6))


@pytest.mark.parametrize(
    ("sigmas", "options", "match"),
    [
        ([1.0, 0.5, 0.0], {}, r"\(0, 1\)"),
        ([0.9, 0.5, 0.0], {"order": 4}, "order"),
        ([0.9, 0.5, 0.0], {"solver_type": "bh3"}, "solver_type"),
    ],
)
def test_unipc_rejects_invalid_arguments(sigmas: list[float], options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_flow_unipc(GaussianFlow(), torch.zeros(SHAPE), sigmas, **options)
