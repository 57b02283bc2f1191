"""EDM (Karras et al., 2022): preconditioning identities, the optimal Gaussian denoiser, sigma draws."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.domain.diffusion.edm import EDM
from dfm.domain.rng import SampleRNG

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)


class GaussianOptimalNetwork:
    """The exact optimal ``F`` for data ``x0 ~ N(0, s^2 I)`` under EDM preconditioning.

    The posterior mean is ``E[x0 | x] = x s^2 / (s^2 + sigma^2)``; ``F`` recovers ``sigma`` from
    ``c_noise = ln(sigma) / 4`` and ``x`` from ``c_in x``, then solves ``D = c_skip x + c_out F``.
    """

    def __init__(self, edm: EDM, data_std: float) -> None:
        self.edm, self.data_std = edm, data_std

    def __call__(
        self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        sigma = torch.exp(4 * timestep)
        c = self.edm.preconditioning(sigma)
        view = lambda t: t.view(-1, 1, 1, 1, 1)
        x_noisy = x / view(c.c_in)
        posterior_mean = x_noisy * view(self.data_std**2 / (self.data_std**2 + sigma**2))
        return (posterior_mean - view(c.c_skip) * x_noisy) / view(c.c_out)


def test_preconditioning_closed_forms() -> None:
    edm = EDM(sigma_data=0.5)
    c = edm.preconditioning(SIGMAS)
    sd = 0.5
    torch.testing.assert_close(c.c_skip, sd**2 / (SIGMAS**2 + sd**2))
    torch.testing.assert_close(c.c_out, SIGMAS * sd / (SIGMAS**2 + sd**2).sqrt())
    torch.testing.assert_close(c.c_in, 1 / (SIGMAS**2 + sd**2).sqrt())
    torch.testing.assert_close(c.c_noise, SIGMAS.log() / 4)
    # sigma = sigma_data: c_skip = 1/2, c_out = sd / sqrt(2), c_in = 1 / (sd sqrt(2)).
    half = edm.preconditioning(torch.tensor([sd], dtype=torch.float64))
    assert half.c_skip.item() == pytest.approx(0.5)
    assert half.c_out.item() == pytest.approx(sd / math.sqrt(2))
    assert half.c_in.item() == pytest.approx(1 / (sd * math.sqrt(2)))


@settings(max_examples=100, deadline=None)
@given(sigma=st.floats(1e-3, 1e3), sd=st.floats(0.05, 5.0))
def test_unit_variance_identities(sigma: float, sd: float) -> None:
    """EDM's design targets (Karras et al., 2022, app. B.6) for data of std ``sigma_data``."""
    edm = EDM(sigma_data=sd)
    c = edm.preconditioning(torch.tensor([sigma], dtype=torch.float64))
    c_skip, c_out, c_in = c.c_skip.item(), c.c_out.item(), c.c_in.item()
    assert c_in**2 * (sd**2 + sigma**2) == pytest.approx(1.0)  # Var(c_in x) = 1
    # Var of the effective target (x0 - c_skip x) / c_out with x = x0 + sigma n equals 1.
    assert ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2 == pytest.approx(1.0)
    # lambda(sigma) c_out^2 = 1: the loss weight makes the effective loss on F unit-weighted.
    assert edm.loss_weight(torch.tensor([sigma], dtype=torch.float64)).item() * c_out**2 == pytest.approx(1.0)


@pytest.mark.parametrize("data_std", [0.5, 1.3])
def test_optimal_network_gives_the_posterior_mean(data_std: float) -> None:
    edm = EDM(sigma_data=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(SIGMAS), 2, 2, 3, 3, generator=g, dtype=torch.float64)
    text = torch.zeros(len(SIGMAS), 4, 8, dtype=torch.float64)
    denoised = edm.denoise(GaussianOptimalNetwork(edm, data_std), x, SIGMAS, text, None)
    expected = x * (data_std**2 / (data_std**2 + SIGMAS**2)).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(denoised, expected)


def test_zero_network_is_optimal_for_data_of_std_sigma_data() -> None:
    """With ``F = 0``, ``D = c_skip x`` is exactly the posterior mean for ``x0 ~ N(0, sigma_data^2)``."""
    edm = EDM(sigma_data=0.5)
    x = torch.randn(len(SIGMAS), 1, 1, 2, 2, dtype=torch.float64)
    zero = lambda x, t, text, mask: torch.zeros_like(x)
    denoised = edm.denoise(zero, x, SIGMAS, torch.zeros(len(SIGMAS), 1, 1), None)
    torch.testing.assert_close(denoised, x * (0.25 / (0.25 + SIGMAS**2)).view(-1, 1, 1, 1, 1))


def test_denoise_passes_c_in_x_and_c_noise_to_the_network() -> None:
    edm = EDM(sigma_data=0.7)
    seen: dict[str, torch.Tensor] = {}

    def network(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        seen["x"], seen["t"] = x, t
        return 2 * x

    x, sigma = torch.randn(2, 3, 1, 2, 2, dtype=torch.float64), torch.tensor([0.3, 4.0], dtype=torch.float64)
    out = edm.denoise(network, x, sigma, torch.zeros(2, 1, 1), None)
    c = edm.preconditioning(sigma)
    v = lambda t: t.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], v(c.c_in) * x)
    torch.testing.assert_close(seen["t"], sigma.log() / 4)
    torch.testing.assert_close(out, v(c.c_skip) * x + v(c.c_out) * 2 * v(c.c_in) * x)


def test_loss_weight_closed_form() -> None:
    edm = EDM(sigma_data=0.5)
    torch.testing.assert_close(edm.loss_weight(SIGMAS), (SIGMAS**2 + 0.25) / (SIGMAS * 0.5) ** 2)
    assert edm.loss_weight(torch.tensor([0.5])).item() == pytest.approx(8.0)  # (0.25 + 0.25) / 0.0625


def test_sigma_draws_are_log_normal() -> None:
    edm = EDM(p_mean=-1.2, p_std=1.2)
    n = 4000
    sigma = edm.draw_sigma(SampleRNG(seed=3, step=9), torch.arange(n))
    assert sigma.dtype == torch.float32 and bool((sigma > 0).all())
    z = ((sigma.double().log() + 1.2) / 1.2).sort().values
    cdf = torch.special.ndtr(z)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((ranks - cdf).abs(), (ranks - 1 / n - cdf).abs()).max().item()
    assert ks < 1.95 / math.sqrt(n)


def test_invalid_sigma_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="sigma_min"):
        EDM(sigma_min=1.0, sigma_max=0.5)
