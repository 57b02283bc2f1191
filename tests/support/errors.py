"""The relative errors the tests compare against their tolerances (in float64, whatever the inputs' dtype)."""

from __future__ import annotations

import torch


def max_rel(got: torch.Tensor | float, want: torch.Tensor | float) -> float:
    """``max |got - want| / max |want|``: the worst element's error on the scale of the reference."""
    a, b = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def norm_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` over all elements together (the relative L2 error)."""
    a, b = got.detach().double(), want.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
