"""EDM (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022).

``x = x0 + sigma n``; ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``. Training draws
``ln sigma ~ N(P_mean, P_std^2)`` per sample and weights the denoising error by
``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (EDM Table 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from attrs import validators as v

from dfm.domain.diffusion.conditioning import (
    DenoiserNetwork,
    NetworkInputs,
    TrainingTerms,
    network_text_mask,
    per_sample_view,
)
from dfm.domain.rng import SampleRNG, Stream


@attrs.frozen(kw_only=True, eq=False)
class Preconditioning:
    """EDM preconditioning coefficients at ``sigma`` (Karras et al., 2022, Table 1), each ``[B]``.

    Attributes:
        c_skip: Skip scaling ``sigma_d^2 / (sigma^2 + sigma_d^2)``.
        c_out: Output scaling ``sigma sigma_d / sqrt(sigma^2 + sigma_d^2)``.
        c_in: Input scaling ``1 / sqrt(sigma^2 + sigma_d^2)``.
        c_noise: Noise conditioning ``ln(sigma) / 4``.
    """

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


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
    image_dropout: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0)])
    """Image-to-video models: probability of replacing a sample's image features and condition latents by zeros
    (the frame mask kept), drawn independently of the text's, for classifier-free guidance on the image; 0: never
    (as Wan 2.1 trained). See ``dfm.domain.diffusion.conditioning.drop_image``."""
    mask_text_padding: bool = True
    """``true``: cross-attention ignores the text's padding tokens (the text mask is applied); ``false``: the
    network attends to all ``data.text_len`` tokens, the padding being zeros. Training and sampling both
    follow it."""

    def __attrs_post_init__(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min} must be below sigma_max={self.sigma_max}")

    def draw_sigma(self, rng: SampleRNG, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Draw ``sigma = exp(P_mean + P_std n)``, ``n ~ N(0, 1)`` from each sample's ``SIGMA`` stream.

        Not clamped: ``sigma_min``/``sigma_max`` bound sampling only (Karras et al., 2022, sec. 5).

        Returns:
            ``sigma`` ``[B]`` float32 on the CPU.
        """
        n = rng.randn(indices, (), Stream.SIGMA)
        return torch.exp(self.p_mean + self.p_std * n)

    def preconditioning(self, sigma: torch.Tensor) -> Preconditioning:
        """The coefficients ``c_skip, c_out, c_in, c_noise`` at ``sigma`` (Karras et al., 2022, Table 1)."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return Preconditioning(
            c_skip=sd2 / total,
            c_out=sigma * self.sigma_data / total.sqrt(),
            c_in=total.rsqrt(),
            c_noise=sigma.log() / 4,
        )

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2`` (Karras et al., 2022)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(
        self,
        network: DenoiserNetwork,
        x: torch.Tensor,
        sigma: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The preconditioned denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` (EDM eq. 7).

        Args:
            network: The raw network ``F``; it sees ``timestep = c_noise``.
            x: Noisy latents ``x0 + sigma n``, ``[B, C, F, H, W]``.
            sigma: Per-sample noise level ``[B]``.
            text: Text embeddings ``[B, S, D]``.
            text_mask: Optional ``[B, S]`` bool mask; the network gets it only when :attr:`mask_text_padding`
                is set.

        Returns:
            The denoised estimate of ``x0``, in ``x``'s dtype.
        """
        c = self.preconditioning(sigma)
        mask = network_text_mask(text_mask, self.mask_text_padding)
        return self._denoised(c, x, network(per_sample_view(c.c_in, x) * x, c.c_noise, text, mask))

    @staticmethod
    def _denoised(c: Preconditioning, x: torch.Tensor, F_x: torch.Tensor) -> torch.Tensor:
        """``c_skip x + c_out F_x``, in ``x``'s dtype."""
        return per_sample_view(c.c_skip, x) * x + per_sample_view(c.c_out, x) * F_x.to(x.dtype)

    def network_inputs(
        self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, text_mask: torch.Tensor | None
    ) -> NetworkInputs:
        """The raw network's inputs for ``x = x0 + sigma n``: ``c_in x`` at ``timestep = c_noise`` (EDM eq. 7).

        Args:
            x0: Clean latents ``[B, C, F, H, W]``, float32.
            eps: Noise ``n ~ N(0, I)``, ``[B, C, F, H, W]``, float32.
            sigma: Per-sample ``sigma`` ``[B]``, float32.
            text_mask: Optional ``[B, S]`` bool mask; passed on only when :attr:`mask_text_padding` is set.
        """
        c, x = self.preconditioning(sigma), x0 + per_sample_view(sigma, x0) * eps
        mask = network_text_mask(text_mask, self.mask_text_padding)
        return NetworkInputs(x=per_sample_view(c.c_in, x) * x, timestep=c.c_noise, text_mask=mask)

    def training_terms(
        self, output: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor
    ) -> TrainingTerms:
        """Denoising regression ``lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2`` (Karras et al., 2022, eq. 8).

        Args:
            output: The raw network's output ``F`` on :meth:`network_inputs`, ``[B, C, F, H, W]``.
            x0: Clean latents, float32.
            eps: Noise, float32.
            sigma: Per-sample ``sigma`` ``[B]``, float32.
        """
        c, x = self.preconditioning(sigma), x0 + per_sample_view(sigma, x0) * eps
        return TrainingTerms(prediction=self._denoised(c, x, output), target=x0, weight=self.loss_weight(sigma))
