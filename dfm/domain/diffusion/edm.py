"""EDM (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022).

``x = x0 + sigma n``; ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``.
"""

from __future__ import annotations

from typing import Literal

import attrs
from attrs import validators as v


@attrs.frozen(kw_only=True)
class EDM:
    """EDM training parameters (the ``diffusion`` config section with ``kind: edm``)."""

    kind: Literal["edm"] = "edm"
    """Diffusion-process tag."""
    p_mean: float = -1.2
    """Mean of ``ln sigma`` during training."""
    p_std: float = attrs.field(default=1.2, validator=v.gt(0.0))
    """Std of ``ln sigma`` during training."""
    sigma_data: float = attrs.field(default=0.5, validator=v.gt(0.0))
    """Std of the data ``sigma_d``."""
    sigma_min: float = attrs.field(default=0.002, validator=v.gt(0.0))
    """Smallest sampling ``sigma``."""
    sigma_max: float = attrs.field(default=80.0, validator=v.gt(0.0))
    """Largest sampling ``sigma``."""
    rho: float = attrs.field(default=7.0, validator=v.gt(0.0))
    """Karras schedule exponent."""
    text_dropout: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.le(1.0)])
    """Probability of replacing a sample's text by the null (zero) text, for classifier-free guidance."""

    def __attrs_post_init__(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min} must be below sigma_max={self.sigma_max}")
