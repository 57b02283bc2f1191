"""Rectified flow matching (Lipman et al., 2023; Esser et al., "Scaling Rectified Flow
Transformers", 2024, for the logit-normal and mode densities and the shift).

``x_t = (1 - sigma) x0 + sigma eps``; the network predicts the velocity ``eps - x0``.

Training draws ``u`` per sample from the configured density (optionally mixed with a uniform
fraction), shifts it to ``sigma = s u / (1 + (s - 1) u)`` and clamps it to ``[sigma_min, sigma_max]``.
The analytic CDF and density of the resulting ``sigma`` are given for property tests and plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from attrs import validators as v

from dfm.domain.diffusion.conditioning import (
    NetworkInputs,
    TrainingTerms,
    network_text_mask,
    per_sample_view,
)
from dfm.domain.rng import SampleRNG, Stream

MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)
"""Largest SD3 mode scale for which ``f_mode`` is monotone on ``[0, 1]`` (so ``u`` stays in ``[0, 1]``)."""


def shift_sigma(u: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Time shift ``sigma = s u / (1 + (s - 1) u)`` (SD3 eq. 23); ``s = 1`` is the identity."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Inverse of :func:`shift_sigma` (SD3 eq. 23): ``u = sigma / (s - (s - 1) sigma)``."""
    return sigma / (shift - (shift - 1) * sigma)


def mode_transform(v: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3 "mode" map ``f(v) = 1 - v - scale (cos^2(pi v / 2) - 1 + v)`` (Esser et al., 2024, sec. 3.1).

    For ``v ~ U(0, 1)``, ``u = f(v)`` has the mode density. ``f`` decreases from ``f(0) = 1`` to
    ``f(1) = 0`` when ``-1 <= scale <= 2 / (pi - 2)``.
    """
    return 1 - v - scale * (torch.cos(math.pi / 2 * v) ** 2 - 1 + v)


def mode_transform_inverse(u: torch.Tensor, scale: float, iterations: int = 60) -> torch.Tensor:
    """Solve ``f(v) = u`` for ``v`` in ``[0, 1]`` (``f`` = :func:`mode_transform`) by bisection.

    Args:
        u: Values in ``[0, 1]``; computed in float64.
        scale: The mode scale, in ``[-1, 2 / (pi - 2)]`` so that ``f`` is monotone.
        iterations: Bisection steps; 60 reaches float64 resolution.

    Returns:
        ``v`` with ``f(v) = u``, float64.
    """
    u = u.double()
    lo, hi = torch.zeros_like(u), torch.ones_like(u)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        right = mode_transform(mid, scale) > u  # f decreases: the root lies right of mid
        lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
    return (lo + hi) / 2


def interpolate(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow forward process ``x_t = (1 - sigma) x0 + sigma eps`` (SD3 sec. 2), ``sigma`` ``[B]``."""
    s = per_sample_view(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching velocity target ``d x_t / d sigma = eps - x0`` (SD3 eq. 3; WAN 2.1)."""
    return eps - x0


def _mode_scale_validator(_inst: object, attr: attrs.Attribute, value: float) -> None:
    if not -1.0 <= value <= MODE_SCALE_MAX:
        raise ValueError(
            f"{attr.name}={value} must lie in [-1, {MODE_SCALE_MAX:.4f}] (= 2/(pi-2)) for the SD3 mode "
            "map to be monotone; SD3 uses 1.29"
        )


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
    mode_scale: float = attrs.field(default=1.29, validator=_mode_scale_validator)
    """Scale of the SD3 mode density, in ``[-1, 2/(pi-2)]``."""
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
    image_dropout: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0)])
    """Image-to-video models: probability of replacing a sample's image features and condition latents by zeros
    (the frame mask kept), drawn independently of the text's, for classifier-free guidance on the image; 0: never
    (as Wan 2.1 trained). See ``dfm.domain.diffusion.conditioning.drop_image``."""
    num_train_timesteps: int = attrs.field(default=1000, validator=v.gt(0))
    """``T``: in training the network sees ``t = sigma T``; a sampler gives it the time its diffusers scheduler
    pairs with each level (UniPC: ``floor(sigma T)``, flow Euler: ``sigma T``)."""
    mask_text_padding: bool = True
    """``true``: cross-attention ignores the text's padding tokens (the text mask is applied); ``false``: the
    network attends to all ``data.text_len`` tokens, the padding being zeros, as WAN 2.1 was trained and as
    diffusers' WanPipeline samples it (the WAN recipes' setting). Training and sampling both follow it."""

    def __attrs_post_init__(self) -> None:
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min} must not exceed sigma_max={self.sigma_max}")

    # --- drawing sigma -------------------------------------------------------------------------

    def u_from_uniform(self, w: torch.Tensor) -> torch.Tensor:
        """Map ``w ~ U(0, 1)`` to ``u`` with the configured density (inverse-CDF / SD3 sampling).

        uniform: ``u = w``; logit-normal: ``u = sigmoid(m + s Phi^-1(w))``; mode: ``u = f_mode(w)``.
        """
        if self.density == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(w))
        if self.density == "mode":
            return mode_transform(w, self.mode_scale)
        return w

    def draw_u(self, rng: SampleRNG, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Draw ``u`` per sample, before the shift (Esser et al., 2024, sec. 3.1).

        Each sample draws two uniforms from its ``SIGMA`` stream: ``c`` chooses the uniform density
        (``c < mix_uniform``), ``w`` is mapped by :meth:`u_from_uniform` otherwise.

        Returns:
            ``u`` ``[B]`` float64 in ``[0, 1]``.
        """
        c, w = rng.rand(indices, (2,), Stream.SIGMA).double().unbind(dim=1)
        return torch.where(c < self.mix_uniform, w, self.u_from_uniform(w))

    def draw_sigma(self, rng: SampleRNG, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Draw the training ``sigma`` per sample: ``clamp(shift(u), sigma_min, sigma_max)``.

        Returns:
            ``sigma`` ``[B]`` float32 on the CPU.
        """
        sigma = shift_sigma(self.draw_u(rng, indices), self.shift).float()
        return sigma.clamp(self.sigma_min, self.sigma_max)

    # --- training terms --------------------------------------------------------------------------

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's training time input ``t = sigma * num_train_timesteps``, continuous (WAN 2.1).

        Sampling with UniPC evaluates the network at integer times ``floor(sigma T)`` (as diffusers' and the
        WAN 2.1 repository's schedulers do); training on the continuous ``t`` covers those too, as in
        DiffSynth-Studio's WAN training (finetrainers truncates to integers instead).
        """
        return sigma * self.num_train_timesteps

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight: ``1`` (``none``) or ``1 + s sigma`` (``shift``)."""
        if self.loss_weighting == "shift":
            return 1 + self.shift * sigma
        return torch.ones_like(sigma)

    def network_inputs(
        self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, text_mask: torch.Tensor | None
    ) -> NetworkInputs:
        """The velocity network's inputs: ``x_t = (1 - sigma) x0 + sigma eps`` at ``timestep = sigma T``.

        Args:
            x0: Clean latents ``[B, C, F, H, W]``, float32.
            eps: Noise ``[B, C, F, H, W]``, float32.
            sigma: Per-sample ``sigma`` ``[B]``, float32.
            text_mask: Optional ``[B, S]`` bool mask; passed on only when :attr:`mask_text_padding` is set.
        """
        mask = network_text_mask(text_mask, self.mask_text_padding)
        return NetworkInputs(x=interpolate(x0, eps, sigma), timestep=self.timestep(sigma), text_mask=mask)

    def training_terms(
        self, output: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor
    ) -> TrainingTerms:
        """Velocity regression: the network's ``output ~ eps - x0``, weight ``w(sigma)``.

        Args:
            output: The network's output on :meth:`network_inputs` ``[B, C, F, H, W]``.
            x0: Clean latents, float32.
            eps: Noise, float32.
            sigma: Per-sample ``sigma`` ``[B]``, float32.
        """
        return TrainingTerms(prediction=output, target=velocity_target(x0, eps), weight=self.loss_weight(sigma))

    # --- analytic density of sigma ---------------------------------------------------------------

    def u_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """CDF of ``u`` (configured density mixed with ``mix_uniform`` of uniform), float64."""
        u = u.double().clamp(0.0, 1.0)
        if self.density == "logit_normal":
            base = torch.special.ndtr((torch.logit(u) - self.logit_mean) / self.logit_std)
        elif self.density == "mode":
            base = 1 - mode_transform_inverse(u, self.mode_scale)  # f decreases: P(f(w) <= u) = 1 - f^-1(u)
        else:
            base = u
        return (1 - self.mix_uniform) * base + self.mix_uniform * u

    def u_pdf(self, u: torch.Tensor) -> torch.Tensor:
        """Density of ``u`` on ``[0, 1]`` (zero outside), float64."""
        u = u.double()
        inside = (u > 0) & (u < 1)  # the branches below may be NaN at the ends; the mask replaces them
        uc = u.clamp(0.0, 1.0)
        if self.density == "logit_normal":
            z = (torch.logit(uc) - self.logit_mean) / self.logit_std
            base = torch.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * self.logit_std * uc * (1 - uc))
        elif self.density == "mode":
            w, s = mode_transform_inverse(uc, self.mode_scale), self.mode_scale
            base = 1 / (1 + s - s * math.pi / 2 * torch.sin(math.pi * w))  # 1 / |f'(w)|
        else:
            base = torch.ones_like(u)
        return torch.where(inside, (1 - self.mix_uniform) * base + self.mix_uniform, torch.zeros_like(u))

    def sigma_cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        """CDF of the training ``sigma`` (after shift and clamp), float64, in ``[0, 1]`` and monotone.

        The clamp puts atoms at the bounds (see :meth:`clamp_masses`): the CDF is 0 below
        ``sigma_min``, jumps there, and is 1 from ``sigma_max`` on.
        """
        sigma = sigma.double()
        inner = self.u_cdf(unshift_sigma(sigma.clamp(0.0, 1.0), self.shift))
        ones, zeros = torch.ones_like(sigma), torch.zeros_like(sigma)
        return torch.where(sigma < self.sigma_min, zeros, torch.where(sigma >= self.sigma_max, ones, inner))

    def sigma_pdf(self, sigma: torch.Tensor) -> torch.Tensor:
        """Density of the continuous part of the training ``sigma``, float64.

        On ``(sigma_min, sigma_max)`` it is ``p_u(u(sigma)) du/dsigma`` with ``du/dsigma = s / (s -
        (s - 1) sigma)^2``; it is zero elsewhere. It integrates to ``1 - sum(clamp_masses())``.
        """
        sigma = sigma.double()
        s = self.shift
        sc = sigma.clamp(0.0, 1.0)
        pdf = self.u_pdf(unshift_sigma(sc, s)) * s / (s - (s - 1) * sc) ** 2
        inside = (sigma > self.sigma_min) & (sigma < self.sigma_max)
        return torch.where(inside, pdf, torch.zeros_like(pdf))

    def clamp_masses(self) -> tuple[float, float]:
        """Probability masses the clamp puts at ``sigma_min`` and at ``sigma_max``."""
        bounds = torch.tensor([self.sigma_min, self.sigma_max], dtype=torch.float64)
        lo, hi = self.u_cdf(unshift_sigma(bounds, self.shift)).tolist()
        if self.sigma_min == self.sigma_max:
            return lo, 1.0 - lo
        return lo, 1.0 - hi
