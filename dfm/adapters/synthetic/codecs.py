"""Toy codecs of the embedded default: latents are pixels, and words have fixed hashed embeddings.

Neither downloads, loads or pickles anything; both give bit-identical results on every machine
(:class:`HashTextEncoder` derives its vectors from SHAKE-256 digests, not from a random generator).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from functools import lru_cache

import attrs
import numpy as np
import torch

from dfm.domain.specs import LatentSpec

_TOKEN = re.compile(r"[a-z0-9]+")
_PIXEL_SPEC = LatentSpec(channels=3, temporal_stride=1, spatial_stride=1)


@attrs.frozen
class IdentityPixelCodec:
    """A :class:`~dfm.ports.codecs.LatentCodec` whose latents are the RGB pixels in ``[-1, 1]``.

    ``latent_spec`` is 3 channels with strides 1, so a ``T x H x W`` clip is a ``[3, T, H, W]`` latent.
    ``encode`` and ``decode`` return their (checked) input unchanged.
    """

    latent_spec: LatentSpec = attrs.field(default=_PIXEL_SPEC, init=False)
    """3 channels, temporal and spatial stride 1."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` -> the same tensor as latents."""
        _check_video(pixels, "pixels")
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 3, T, H, W]`` -> the same tensor as pixels."""
        _check_video(latents, "latents")
        return latents


def _check_video(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"IdentityPixelCodec: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"IdentityPixelCodec: {name} must be [B, 3, T, H, W] (RGB), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"IdentityPixelCodec: {name} must be a floating tensor in [-1, 1], got {x.dtype}")


def tokenize(caption: str) -> list[str]:
    """Lower-cased words: maximal runs of ``[a-z0-9]``; whitespace and punctuation separate them."""
    return _TOKEN.findall(caption.lower())


@attrs.frozen(kw_only=True)
class HashTextEncoder:
    """A deterministic :class:`~dfm.ports.codecs.TextEncoder` with fixed word vectors.

    Token ``i`` (word ``w``) embeds as ``R_i word(w) + position_scale * position(i)``:

    - ``word(w)``: a unit vector with components uniform in ``[-1, 1]`` before normalisation, read from
      the SHAKE-256 digest of ``w`` (stable across machines, Python versions and processes).
    - ``R_i``: the rotary rotation of position ``i`` (Su et al., "RoFormer", 2021): channel pairs
      ``(2k, 2k+1)`` turn by ``i * 10000^(-2k/D)``, so even a sum over tokens depends on word order.
    - ``position(i)``: the sinusoidal encoding of Vaswani et al. ("Attention Is All You Need", 2017),
      scaled to unit norm: an absolute position signal for cross-attention without positional encoding.

    Captions are cut to ``max_length`` tokens; the rest of the ``[B, max_length, dim]`` output is zeros
    and the mask is ``True`` exactly on real tokens (an empty caption has an all-``False`` row).
    """

    dim: int = attrs.field(default=64, validator=attrs.validators.ge(2))
    """Embedding width ``D``."""
    position_scale: float = attrs.field(default=0.5, validator=attrs.validators.ge(0.0))
    """Weight of the positional component relative to the unit word vector."""

    def encode(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed captions: ``([B, max_length, dim] float32, [B, max_length] bool mask)``."""
        if isinstance(captions, str):
            raise ValueError("HashTextEncoder.encode takes a sequence of captions, not one string")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        emb = np.zeros((len(captions), max_length, self.dim), dtype=np.float32)
        mask = np.zeros((len(captions), max_length), dtype=bool)
        positions = _positions(max_length, self.dim) * self.position_scale
        for b, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise ValueError(f"captions[{b}] must be a str, got {type(caption).__name__}")
            words = tokenize(caption)[:max_length]
            if words:
                vectors = np.stack([_word_vector(word, self.dim) for word in words])
                emb[b, : len(words)] = _rotate(vectors) + positions[: len(words)]
            mask[b, : len(words)] = True
        return torch.from_numpy(emb), torch.from_numpy(mask)


@lru_cache(maxsize=8192)
def _word_vector(word: str, dim: int) -> np.ndarray:
    """Unit vector of ``word`` from its SHAKE-256 digest (read-only, float32)."""
    digest = hashlib.shake_256(f"dfm-hash-text/{word}".encode()).digest(4 * dim)
    u = np.frombuffer(digest, dtype="<u4").astype(np.float64)
    x = (u + 0.5) / 2.0**31 - 1.0  # uniform in (-1, 1)
    out = (x / np.linalg.norm(x)).astype(np.float32)
    out.flags.writeable = False
    return out


def _rotate(vectors: np.ndarray) -> np.ndarray:
    """Rotary rotation of row ``i`` of ``vectors [n, D]`` by position ``i`` (an odd last channel stays)."""
    n, dim = vectors.shape
    angles = np.arange(n, dtype=np.float64)[:, None] * _frequencies(dim)[None, :]  # [n, D // 2]
    cos, sin = np.cos(angles), np.sin(angles)
    out = vectors.astype(np.float64)
    x, y = out[:, 0 : 2 * (dim // 2) : 2].copy(), out[:, 1 : 2 * (dim // 2) : 2].copy()
    out[:, 0 : 2 * (dim // 2) : 2] = x * cos - y * sin
    out[:, 1 : 2 * (dim // 2) : 2] = x * sin + y * cos
    return out.astype(np.float32)


def _frequencies(dim: int) -> np.ndarray:
    """``10000^(-2k/D)`` for ``k = 0 .. D // 2 - 1``."""
    return np.exp(-math.log(10000.0) * np.arange(0, 2 * (dim // 2), 2, dtype=np.float64) / dim)


@lru_cache(maxsize=64)
def _positions(length: int, dim: int) -> np.ndarray:
    """Sinusoidal position vectors ``[length, dim]``, each of unit norm (float32, read-only)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = _frequencies(dim)[None, :]
    table = np.zeros((length, dim), dtype=np.float64)
    table[:, 0 : 2 * (dim // 2) : 2] = np.sin(pos * freq)
    table[:, 1 : 2 * (dim // 2) : 2] = np.cos(pos * freq)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    out = table.astype(np.float32)
    out.flags.writeable = False
    return out


@attrs.frozen
class PatchImageEncoder:
    """A toy image encoder for synthetic image-to-video data: an image's ``patch x patch`` pixel blocks, flattened.

    Images ``[H, W, 3]`` uint8 (``H``, ``W`` multiples of ``patch``) give ``(H / patch) (W / patch)`` rows of
    ``3 patch^2`` values in ``[-1, 1]``: everything the first frame shows, at no cost (implements the
    ``ImageEncoder`` port; the stand-in of CLIP as :class:`IdentityPixelCodec` is of the VAE).
    """

    patch: int = 4

    @property
    def dim(self) -> int:
        """Feature width ``3 patch^2``."""
        return 3 * self.patch * self.patch

    def encode(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` images -> ``[N, (H / p)(W / p), 3 p^2]`` float32.

        Raises:
            ValueError: Images of different sizes, or sizes that are not multiples of ``patch``.
        """
        stack = torch.stack([torch.as_tensor(image) for image in images])
        n, h, w, c = stack.shape
        p = self.patch
        if stack.dtype != torch.uint8 or c != 3 or h % p or w % p:
            raise ValueError(f"images must be uint8 [H, W, 3] with H and W multiples of {p}, got {tuple(stack.shape)}")
        blocks = stack.float().div(127.5).sub(1).view(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, (h // p) * (w // p), p * p * c)
