"""The batch that crosses from data sources into the training objective."""

from __future__ import annotations

import attrs
import torch


@attrs.frozen(kw_only=True, eq=False)
class Batch:
    """One (micro-)batch of training samples, already in latent space.

    Attributes:
        latents: Clean latents ``x0`` of shape ``[B, C, F, H, W]``.
        text: Text embeddings of shape ``[B, S, D]`` (padded to a common ``S``).
        sample_index: Global sample indices, ``[B]`` int64. They key every random draw of a sample
            (DESIGN.md rule 2), so any parallel split of the same global batch draws the same noise.
        text_mask: Optional ``[B, S]`` bool mask, ``True`` for real tokens.
        captions: Optional captions, for logging and samples only.
    """

    latents: torch.Tensor
    text: torch.Tensor
    sample_index: torch.Tensor
    text_mask: torch.Tensor | None = None
    captions: tuple[str, ...] | None = None

    def __attrs_post_init__(self) -> None:
        b = self.latents.shape[0]
        assert self.latents.ndim == 5, f"latents must be [B, C, F, H, W], got {tuple(self.latents.shape)}"
        assert self.text.ndim == 3 and self.text.shape[0] == b, "text must be [B, S, D]"
        assert self.sample_index.shape == (b,), "sample_index must be [B]"

    @property
    def size(self) -> int:
        """Number of samples ``B``."""
        return int(self.latents.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device`` (and floating tensors to ``dtype`` when given)."""
        mask = None if self.text_mask is None else self.text_mask.to(device)
        return Batch(
            latents=self.latents.to(device=device, dtype=dtype or self.latents.dtype),
            text=self.text.to(device=device, dtype=dtype or self.text.dtype),
            sample_index=self.sample_index.to(device),
            text_mask=mask,
            captions=self.captions,
        )
