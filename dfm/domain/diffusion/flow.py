"""Rectified flow matching (Lipman et al., 2023; Esser et al., "Scaling Rectified Flow
Transformers", 2024, for the logit-normal and mode densities and the shift).

``x_t = (1 - sigma) x0 + sigma eps``; the network predicts the velocity ``eps - x0``.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from attrs import validators as v


def shift_sigma(u: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Time shift ``sigma = s u / (1 + (s - 1) u)`` (SD3 eq. 23); ``s = 1`` is the identity."""
    return shift * u / (1 + (shift - 1) * u)


@attrs.frozen(kw_only=True)
class FlowMatching:
    """Flow-matching training parameters (the ``diffusion`` config section with ``kind: flow``)."""

    kind: Literal["flow"] = "flow"
    """Diffusion-process tag."""
    density: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    """Density of ``u`` before the shift: uniform, logit-normal(mean, std) or SD3 "mode"(scale)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal density."""
    logit_std: float = attrs.field(default=1.0, validator=v.gt(0.0))
    """Std of the logit-normal density."""
    mode_scale: float = 1.29
    """Scale of the SD3 mode density."""
    mix_uniform: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0)])
    """Fraction of samples whose ``u`` is drawn uniformly instead."""
    shift: float = attrs.field(default=1.0, validator=v.gt(0.0))
    """Time shift ``s``; larger values move ``sigma`` towards noise."""
    sigma_min: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0)])
    """Lower clamp of ``sigma``."""
    sigma_max: float = attrs.field(default=1.0, validator=[v.ge(0.0), v.le(1.0)])
    """Upper clamp of ``sigma``."""
    loss_weighting: Literal["none", "shift"] = "none"
    """``none``: weight 1; ``shift``: weight ``1 + s sigma``."""
    text_dropout: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.le(1.0)])
    """Probability of replacing a sample's text by the null (zero) text, for classifier-free guidance."""
    num_train_timesteps: int = attrs.field(default=1000, validator=v.gt(0))
    """The network sees ``t = sigma * num_train_timesteps``."""

    def __attrs_post_init__(self) -> None:
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min} must not exceed sigma_max={self.sigma_max}")
