"""Flow matching (SD3 / WAN 2.1): sigma draws vs. the analytic density, shift, interpolation, weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.domain.diffusion.flow import (
    MODE_SCALE_MAX,
    FlowMatching,
    interpolate,
    mode_transform,
    mode_transform_inverse,
    shift_sigma,
    unshift_sigma,
    velocity_target,
)
from dfm.domain.rng import SampleRNG, Stream

N_DRAWS = 4000
KS_CRITICAL = 1.95 / math.sqrt(N_DRAWS)  # Kolmogorov-Smirnov, alpha = 0.001 (conservative with atoms)

CONFIGS = {
    "uniform": FlowMatching(density="uniform"),
    "logit_normal": FlowMatching(density="logit_normal", logit_mean=0.3, logit_std=0.8),
    "mode": FlowMatching(density="mode", mode_scale=1.29),
    "mode_negative": FlowMatching(density="mode", mode_scale=-0.7),
    "logit_normal_mix_shift": FlowMatching(density="logit_normal", mix_uniform=0.3, shift=3.0),
    "mode_mix_shift": FlowMatching(density="mode", mode_scale=0.8, mix_uniform=0.5, shift=5.0),
    "uniform_shift_clamped": FlowMatching(density="uniform", shift=0.5, sigma_min=0.1, sigma_max=0.8),
    "logit_normal_clamped": FlowMatching(density="logit_normal", logit_mean=-0.5, sigma_min=0.2, sigma_max=0.9),
}

flow_configs = st.builds(
    FlowMatching,
    density=st.sampled_from(["uniform", "logit_normal", "mode"]),
    logit_mean=st.floats(-3.0, 3.0),
    logit_std=st.floats(0.1, 3.0),
    mode_scale=st.floats(-1.0, MODE_SCALE_MAX),
    mix_uniform=st.floats(0.0, 1.0),
    shift=st.floats(0.05, 20.0),
).flatmap(
    lambda fm: st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(
        lambda b: FlowMatching(**{**_fields(fm), "sigma_min": min(b), "sigma_max": max(b)})
    )
)


def _fields(fm: FlowMatching) -> dict[str, object]:
    return {
        name: getattr(fm, name) for name in ("density", "logit_mean", "logit_std", "mode_scale", "mix_uniform", "shift")
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sigma_draws_follow_the_analytic_cdf(name: str) -> None:
    fm = CONFIGS[name]
    sigma = fm.draw_sigma(SampleRNG(seed=11, step=5), torch.arange(N_DRAWS))
    grid = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
    # Compare in float32, the dtype of the draws (the clamp bounds are float32-rounded there).
    empirical = (sigma[None, :] <= grid.float()[:, None]).double().mean(dim=1)
    ks = (empirical - fm.sigma_cdf(grid)).abs().max().item()
    assert ks < KS_CRITICAL, f"{name}: KS distance {ks:.4f} >= {KS_CRITICAL:.4f}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_density_integrates_to_one_with_the_clamp_atoms(name: str) -> None:
    fm = CONFIGS[name]
    # Midpoint rule on a fine grid, plus the probability masses the clamp puts at the bounds.
    n = 20_000
    mids = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    pdf = fm.sigma_pdf(mids)
    assert bool((pdf >= 0).all()) and bool(torch.isfinite(pdf).all())
    lo, hi = fm.clamp_masses()
    assert pdf.mean().item() + lo + hi == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("name", ["logit_normal", "mode", "logit_normal_mix_shift", "mode_mix_shift"])
def test_density_is_the_derivative_of_the_cdf(name: str) -> None:
    fm = CONFIGS[name]
    x = torch.linspace(0.02, 0.98, 97, dtype=torch.float64)
    h = 1e-6
    numeric = (fm.sigma_cdf(x + h) - fm.sigma_cdf(x - h)) / (2 * h)
    torch.testing.assert_close(fm.sigma_pdf(x), numeric, rtol=1e-4, atol=1e-6)


def test_logit_normal_density_closed_form() -> None:
    fm = FlowMatching(density="logit_normal", logit_mean=0.0, logit_std=1.0)
    # p(1/2) = phi(0) / (1/2 * 1/2) = 4 / sqrt(2 pi); CDF(1/2) = 1/2 for mean 0.
    half = torch.tensor([0.5], dtype=torch.float64)
    assert fm.u_pdf(half).item() == pytest.approx(4 / math.sqrt(2 * math.pi))
    assert fm.u_cdf(half).item() == pytest.approx(0.5)
    assert fm.u_pdf(torch.tensor([0.0, 1.0])).tolist() == [0.0, 0.0]


def test_mode_transform_endpoints_and_inverse() -> None:
    v = torch.linspace(0, 1, 101, dtype=torch.float64)
    for scale in (-1.0, 0.0, 1.29, MODE_SCALE_MAX):
        u = mode_transform(v, scale)
        assert u[0].item() == pytest.approx(1.0) and u[-1].item() == pytest.approx(0.0, abs=1e-12)
        assert bool((u[1:] <= u[:-1] + 1e-12).all()), "f_mode must decrease"
        # At scale = -1, f'(0) = f'(1) = 0: the inverse is ill-conditioned there (error ~ sqrt(float eps)).
        torch.testing.assert_close(mode_transform_inverse(u, scale), v, atol=1e-7, rtol=0)
    torch.testing.assert_close(mode_transform(v, 0.0), 1 - v)


def test_mode_scale_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode_scale"):
        FlowMatching(density="mode", mode_scale=2.0)
    with pytest.raises(ValueError, match="sigma_min"):
        FlowMatching(sigma_min=0.6, sigma_max=0.4)


def test_mix_uniform_one_is_uniform_and_zero_is_the_density() -> None:
    rng, idx = SampleRNG(seed=1, step=2), torch.arange(64)
    all_uniform = FlowMatching(density="logit_normal", mix_uniform=1.0).draw_u(rng, idx)
    plain_uniform = FlowMatching(density="uniform").draw_u(rng, idx)
    assert torch.equal(all_uniform, plain_uniform)
    ln = FlowMatching(density="logit_normal", mix_uniform=0.0)
    w = rng.rand(idx, (2,), Stream.SIGMA).double()[:, 1]
    torch.testing.assert_close(ln.draw_u(rng, idx), torch.sigmoid(torch.special.ndtri(w)))


def test_interpolation_and_velocity_target_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 2, 3, 3, generator=g), torch.randn(3, 2, 2, 3, 3, generator=g)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    x_t = interpolate(x0, eps, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], eps[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    v = velocity_target(x0, eps)
    s = sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_t + (1 - s) * v, eps)  # integrating the velocity to sigma = 1
    torch.testing.assert_close(x_t - s * v, x0)  # and back to sigma = 0


def test_weights_and_timesteps() -> None:
    sigma = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(FlowMatching(loss_weighting="none", shift=3.0).loss_weight(sigma), torch.ones(3))
    torch.testing.assert_close(FlowMatching(loss_weighting="shift", shift=3.0).loss_weight(sigma), 1 + 3.0 * sigma)
    torch.testing.assert_close(
        FlowMatching(num_train_timesteps=1000).timestep(sigma), torch.tensor([0.0, 500.0, 1000.0])
    )


@settings(max_examples=60, deadline=None)
@given(fm=flow_configs, seed=st.integers(0, 2**32), step=st.integers(0, 10**6), start=st.integers(0, 10**9))
def test_sigma_always_within_the_clamp(fm: FlowMatching, seed: int, step: int, start: int) -> None:
    sigma = fm.draw_sigma(SampleRNG(seed=seed, step=step), torch.arange(start, start + 16))
    assert sigma.dtype == torch.float32 and sigma.shape == (16,)
    assert bool((sigma >= fm.sigma_min).all()) and bool((sigma <= fm.sigma_max).all())


@settings(max_examples=60, deadline=None)
@given(fm=flow_configs)
def test_cdf_is_within_unit_interval_and_monotone(fm: FlowMatching) -> None:
    x = torch.linspace(-0.1, 1.1, 241, dtype=torch.float64)
    cdf = fm.sigma_cdf(x)
    assert bool(((cdf >= 0) & (cdf <= 1)).all())
    assert bool((cdf[1:] >= cdf[:-1] - 1e-12).all())
    assert cdf[0].item() == 0.0 and cdf[-1].item() == 1.0
    pdf = fm.sigma_pdf(x)
    assert bool((pdf >= 0).all()) and not bool(torch.isnan(pdf).any())


@settings(max_examples=200, deadline=None)
@given(u=st.floats(0.0, 1.0), s=st.floats(0.01, 100.0), du=st.floats(0.0, 1.0), ds=st.floats(1.0, 10.0))
def test_shift_fixes_the_ends_and_is_monotone_in_u_and_s(u: float, s: float, du: float, ds: float) -> None:
    assert shift_sigma(0.0, s) == 0.0
    assert shift_sigma(1.0, s) == pytest.approx(1.0)
    u2 = u + (1 - u) * du
    assert shift_sigma(u2, s) >= shift_sigma(u, s) - 1e-12
    assert shift_sigma(u, s * ds) >= shift_sigma(u, s) - 1e-12
    assert unshift_sigma(shift_sigma(u, s), s) == pytest.approx(u, abs=1e-9)
    assert shift_sigma(u, 1.0) == pytest.approx(u)
