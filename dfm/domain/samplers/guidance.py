"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022).

``pred = pred(x | null) + scale (pred(x | text) - pred(x | null))``, where ``null`` is the null
(dropped-out) text or a negative prompt. Both passes run as one forward over the doubled batch, or as two
forwards (``batched=False``, as diffusers' ``WanPipeline`` runs them).
The combination is affine with weights summing to 1, so guiding the velocity of a flow model is the
same as guiding its data prediction ``x - sigma v``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dfm.domain.samplers.schedules import Denoiser

Sigma = float | torch.Tensor
"""One level for the batch (float or 0-d tensor) or one per sample (``[B]``)."""


class TextModel(Protocol):
    """A text-conditional network: ``(x, sigma, text [B, S, D], text_mask [B, S] or None) -> prediction``."""

    def __call__(
        self, x: torch.Tensor, sigma: Sigma, text: torch.Tensor, text_mask: torch.Tensor | None, /
    ) -> torch.Tensor: ...


def guided(
    model_fn: TextModel,
    *,
    text: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    null_text: torch.Tensor | None = None,
    null_text_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    batched: bool = True,
) -> Denoiser:
    """Bind the text and the guidance scale: the returned ``(x, sigma) -> prediction`` feeds any sampler.

    For ``scale != 1`` each call runs ``model_fn`` once on ``[x, x]`` with ``[text, null_text]`` and
    returns ``uncond + scale (cond - uncond)``; ``scale = 1`` runs the conditional pass only and
    ``scale = 0`` the unconditional pass only. The doubled text is built once, here.

    Args:
        model_fn: The text-conditional network.
        text: Text embeddings ``[B, S, D]``.
        text_mask: Optional ``[B, S]`` bool mask, ``True`` for real tokens.
        null_text: The unconditional text ``[1 or B, S', D]`` (the null text the model was trained
            with under text dropout, or a negative prompt); required unless ``scale == 1``. A length
            ``S' != S`` is padded with masked-out zeros (attended where the process does not mask padding).
        null_text_mask: Optional ``[1 or B, S']`` mask of ``null_text``.
        scale: Guidance scale ``w``; WAN 2.1 uses 5.
        batched: Run both passes as one forward over ``[x, x]`` (``True``) or as two forwards. The results are
            equal up to float rounding; which is faster depends on the network and the device.

    Returns:
        The guided denoiser.

    Raises:
        ValueError: when ``null_text`` is missing or its shape does not fit ``text``.
    """
    if scale == 1.0:
        return lambda x, sigma: model_fn(x, sigma, text, text_mask)
    if null_text is None:
        raise ValueError(f"guidance scale {scale} needs null_text (the null or negative-prompt embedding)")
    null_text, null_text_mask = _broadcast_null(text, null_text, null_text_mask)
    if scale == 0.0:
        return lambda x, sigma: model_fn(x, sigma, null_text, null_text_mask)
    if not batched:

        def two_passes(x: torch.Tensor, sigma: Sigma) -> torch.Tensor:
            cond = model_fn(x, sigma, text, text_mask)
            uncond = model_fn(x, sigma, null_text, null_text_mask)
            return uncond + scale * (cond - uncond)

        return two_passes
    both_text, both_mask = _concat_texts(text, text_mask, null_text, null_text_mask)

    def denoise(x: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        cond, uncond = model_fn(torch.cat([x, x]), _double(sigma), both_text, both_mask).chunk(2)
        return uncond + scale * (cond - uncond)

    return denoise


def _broadcast_null(
    text: torch.Tensor, null_text: torch.Tensor, null_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expand a batch-1 null text to the batch of ``text``; check the embedding width."""
    batch, width = text.shape[0], text.shape[-1]
    if null_text.ndim != 3 or null_text.shape[0] not in (1, batch) or null_text.shape[-1] != width:
        raise ValueError(f"null_text must be [1 or {batch}, S, {width}], got {tuple(null_text.shape)}")
    null_text = null_text.expand(batch, -1, -1)
    if null_mask is not None:
        null_mask = null_mask.expand(batch, -1)
    return null_text, null_mask


def _concat_texts(
    text: torch.Tensor, mask: torch.Tensor | None, null_text: torch.Tensor, null_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[text, null_text]`` along the batch, padding the shorter sequence with masked-out zeros."""
    if text.shape[1] == null_text.shape[1]:
        if mask is None and null_mask is None:
            return torch.cat([text, null_text]), None
        if mask is not None and null_mask is not None:
            return torch.cat([text, null_text]), torch.cat([mask, null_mask])
    length = max(text.shape[1], null_text.shape[1])
    text, mask = _pad_tokens(text, mask, length)
    null_text, null_mask = _pad_tokens(null_text, null_mask, length)
    return torch.cat([text, null_text]), torch.cat([mask, null_mask])


def _pad_tokens(text: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``text`` to ``length`` tokens with a mask that is ``False`` on the padding."""
    batch, tokens = text.shape[:2]
    if mask is None:
        mask = torch.ones(batch, tokens, dtype=torch.bool, device=text.device)
    pad = length - tokens
    text = torch.cat([text, text.new_zeros(batch, pad, text.shape[2])], dim=1)
    mask = torch.cat([mask.to(torch.bool), mask.new_zeros(batch, pad, dtype=torch.bool)], dim=1)
    return text, mask


def _double(sigma: Sigma) -> Sigma:
    """The level(s) for the doubled batch: per-sample levels are repeated, shared ones kept."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
        return torch.cat([sigma, sigma])
    return sigma
