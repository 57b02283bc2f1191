"""EDM Euler/Heun: against diffusers' EDMEulerScheduler, the closed-form Gaussian ODE, and churn."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from diffusers import EDMEulerScheduler
from support.errors import max_rel

from dfm.domain.diffusion.edm import EDM
from dfm.domain.samplers import karras_sigmas, sample_edm_euler, sample_edm_heun

SHAPE = (2, 4, 3, 5, 5)  # [B, C, F, H, W]


class GaussianDenoiser:
    """The exact ``D(x; sigma) = mu + (x - mu) sd^2 / (sd^2 + sigma^2)`` for data ``N(mu, sd^2)``."""

    def __init__(self, mu: float = 0.0, sd: float = 0.5) -> None:
        self.mu, self.sd = mu, sd
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.sigmas.append(sigma)
        return (self.mu + (x.double() - self.mu) * self.sd**2 / (self.sd**2 + sigma**2)).to(x.dtype)


def _diffusers_trajectory(denoise: GaussianDenoiser, x: torch.Tensor, n: int, edm: EDM) -> list[torch.Tensor]:
    """diffusers' loop with a network ``F`` that its preconditioning turns into ``denoise``.

    The scheduler computes ``D = c_skip x + c_out F`` with its own float32 ``c_skip, c_out``; the model
    returns ``F = (D(x; sigma) - c_skip x) / c_out`` with the same coefficients.
    """
    scheduler = EDMEulerScheduler(
        sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, sigma_data=edm.sigma_data, rho=edm.rho
    )
    scheduler.set_timesteps(n)
    states = []
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        scheduler.scale_model_input(x, t)  # c_in x: what a real network would see
        c_skip = edm.sigma_data**2 / (sigma**2 + edm.sigma_data**2)
        c_out = sigma * edm.sigma_data / (sigma**2 + edm.sigma_data**2) ** 0.5
        F = (denoise(x, float(sigma)).double() - c_skip.double() * x.double()) / c_out.double()
        x = scheduler.step(F.to(x.dtype), t, x).prev_sample
        states.append(x)
    return states


@pytest.mark.parametrize(
    "edm",
    [EDM(), EDM(sigma_min=0.01, sigma_max=20.0, rho=5.0, sigma_data=1.0)],
    ids=["paper", "custom"],
)
@pytest.mark.parametrize("n", [10, 30])
def test_edm_euler_matches_diffusers_every_step(n: int, edm: EDM) -> None:
    denoise = GaussianDenoiser(mu=0.3, sd=0.7)
    x = edm.sigma_max * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = _diffusers_trajectory(denoise, x.clone(), n, edm)
    states: list[torch.Tensor] = []
    sigmas = karras_sigmas(n, sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=edm.rho)
    sample_edm_euler(denoise, x.clone(), sigmas, callback=lambda i, total, s: states.append(s))
    assert len(states) == n
    assert max(max_rel(a, b) for a, b in zip(states, expected, strict=True)) <= 1e-5


def _error_at_sigma_min(sampler: Callable[..., torch.Tensor], intervals: int) -> float:
    """Relative error at ``sigma_min`` after ``intervals`` steps on the Karras grid, against the closed form
    ``x(sigma) = x(sigma_max) sqrt(sd^2 + sigma^2) / sqrt(sd^2 + sigma_max^2)`` of the Gaussian PF-ODE."""
    sd, edm = 0.5, EDM()
    x = edm.sigma_max * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = karras_sigmas(intervals + 1, sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=edm.rho)
    states: list[torch.Tensor] = []
    sampler(GaussianDenoiser(sd=sd), x, sigmas, callback=lambda i, total, s: states.append(s))
    sigma_max, sigma_min = float(sigmas[0]), float(sigmas[-2])
    exact = x * math.sqrt(sd**2 + sigma_min**2) / math.sqrt(sd**2 + sigma_max**2)
    return max_rel(states[intervals - 1], exact)


@pytest.mark.parametrize(("sampler", "low", "high"), [(sample_edm_heun, 1.8, 2.3), (sample_edm_euler, 0.8, 1.2)])
def test_edm_convergence_order_on_the_gaussian_closed_form(
    sampler: Callable[..., torch.Tensor], low: float, high: float
) -> None:
    errors = [_error_at_sigma_min(sampler, k) for k in (8, 16, 32, 64)]
    orders = [math.log2(errors[k] / errors[k + 1]) for k in range(3)]
    assert all(low <= p <= high for p in orders), (errors, orders)


def test_heun_evaluates_the_new_point_and_skips_the_correction_at_zero() -> None:
    denoise = GaussianDenoiser()
    x = torch.randn(SHAPE, dtype=torch.float64)
    sample_edm_heun(denoise, x, [2.0, 1.0, 0.5, 0.0])
    assert denoise.sigmas == [2.0, 1.0, 1.0, 0.5, 0.5]  # 2N - 1 calls; the 2nd of each pair at sigma_{i+1}, none at 0

    D = GaussianDenoiser()
    d = (x - D(x, 2.0)) / 2.0
    x_euler = x + (1.0 - 2.0) * d
    d_new = (x_euler - D(x_euler, 1.0)) / 1.0
    torch.testing.assert_close(sample_edm_heun(D, x, [2.0, 1.0]), x + (1.0 - 2.0) * (d + d_new) / 2)
    torch.testing.assert_close(sample_edm_heun(D, x, [0.5, 0.0]), D(x, 0.5))  # Euler into 0 lands on D(x; sigma)


@pytest.mark.parametrize("sampler", [sample_edm_euler, sample_edm_heun])
def test_churn_is_reproducible_per_seed_and_depends_on_it(sampler: Callable[..., torch.Tensor]) -> None:
    edm = EDM()
    sigmas = karras_sigmas(12, sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=edm.rho)
    x = edm.sigma_max * torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    churn = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}

    def run(seed: int) -> torch.Tensor:
        return sampler(GaussianDenoiser(), x, sigmas, generator=torch.Generator().manual_seed(seed), **churn)

    deterministic = sampler(GaussianDenoiser(), x, sigmas)
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    assert not torch.allclose(run(0), deterministic)
    # without churn the generator is never drawn from
    plain = sampler(GaussianDenoiser(), x, sigmas, generator=torch.Generator().manual_seed(9))
    assert torch.equal(plain, deterministic)


def test_churn_with_per_sample_generators_is_batch_invariant() -> None:
    sigmas = karras_sigmas(8)
    x = 80.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    churn = {"s_churn": 30.0, "s_tmin": 0.05, "s_tmax": 50.0}
    gens = lambda: [torch.Generator().manual_seed(10 + b) for b in range(SHAPE[0])]
    batch = sample_edm_heun(GaussianDenoiser(), x, sigmas, generator=gens(), **churn)
    for b in range(SHAPE[0]):
        alone = sample_edm_heun(GaussianDenoiser(), x[b : b + 1], sigmas, generator=[gens()[b]], **churn)
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=0, atol=0)


def test_churn_without_generator_is_an_error() -> None:
    with pytest.raises(ValueError, match="Generator"):
        sample_edm_heun(GaussianDenoiser(), torch.zeros(SHAPE), karras_sigmas(4), s_churn=10.0)
    with pytest.raises(ValueError, match="generators"):
        sample_edm_euler(
            GaussianDenoiser(), torch.zeros(SHAPE), karras_sigmas(4), s_churn=10.0, generator=[torch.Generator()]
        )
