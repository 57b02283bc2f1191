"""Closed-form oracles shared by sampler tests."""

from __future__ import annotations

import torch

SHAPE = (2, 4, 3, 5, 5)  # [B, C, F, H, W]


class GaussianFlow:
    """Data ``x0 ~ N(mu, s^2)`` per channel; ``x_sigma = (1 - sigma) x0 + sigma eps``.

    The exact velocity is ``E[eps - x0 | x] = (x - E[x0 | x]) / sigma`` with
    ``E[x0 | x] = mu + (1 - sigma) s^2 (x - (1 - sigma) mu) / ((1 - sigma)^2 s^2 + sigma^2)``, and the
    ODE transports ``x`` as ``x(sigma) = (1 - sigma) mu + std(sigma) z`` with
    ``std(sigma) = sqrt((1 - sigma)^2 s^2 + sigma^2)``.
    """

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(1, SHAPE[1], 1, 1, 1, generator=g, dtype=torch.float64)
        self.s = 0.3 + torch.rand(1, SHAPE[1], 1, 1, 1, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        a, xd = 1.0 - sigma, x.double()
        x0 = self.mu + a * self.s**2 * (xd - a * self.mu) / (a**2 * self.s**2 + sigma**2)
        return ((xd - x0) / sigma).to(x.dtype)

    def transport(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact ODE solution at ``sigma_to`` starting from ``x`` at ``sigma_from``."""
        std = lambda sigma: torch.sqrt((1 - sigma) ** 2 * self.s**2 + sigma**2)
        z = (x - (1 - sigma_from) * self.mu) / std(sigma_from)
        return (1 - sigma_to) * self.mu + std(sigma_to) * z
