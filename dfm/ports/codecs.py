"""Pixels <-> latents and captions -> embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from dfm.domain.specs import LatentSpec


@runtime_checkable
class LatentCodec(Protocol):
    """Encodes videos ``[B, 3, T, H, W]`` in ``[-1, 1]`` to normalised latents ``[B, C, F, H', W']`` and back."""

    latent_spec: LatentSpec

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Embeds captions: returns embeddings ``[B, S, D]`` and a ``[B, S]`` bool mask of real tokens."""

    dim: int

    def encode(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class ImageEncoder(Protocol):
    """Embeds images (uint8 ``[H, W, 3]`` each) as feature rows ``[N, R, dim]`` (image-to-video conditioning)."""

    dim: int

    def encode(self, images: Sequence[torch.Tensor]) -> torch.Tensor: ...
