"""The prepared-sample format: what ``python -m dfm.app.prepare`` writes and the data sources read.

One sample is two members (webdataset shard members, or columns of a Hugging Face dataset):

- :data:`TENSORS` (``"tensors.safetensors"``): safetensors bytes holding :data:`LATENTS`, the VAE latents
  ``[C, F, H, W]`` already normalised per channel, and :data:`TEXT`, the caption's text-encoder
  embeddings ``[L, D]`` trimmed to its ``L`` real tokens (``L = meta.text_len``, 0 for an empty caption).
- :data:`META` (``"meta.json"``): the JSON record :class:`SampleMeta`.

No pickle anywhere: tensors are safetensors, everything else JSON. :func:`decode_sample` is the format's
one reader (with its checks), so every data source reads a sample, and rejects a bad one, identically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load

FORMAT_VERSION = 1
"""Bumped when the record changes incompatibly; readers refuse other versions with a clear error."""
TENSORS = "tensors.safetensors"
"""Member / column with the safetensors bytes."""
META = "meta.json"
"""Member / column with the JSON record."""
LATENTS = "latents"
"""Tensor name of the normalised latents ``[C, F, H, W]``."""
TEXT = "text"
"""Tensor name of the trimmed text embeddings ``[L, D]``."""


@attrs.frozen(kw_only=True)
class SampleMeta:
    """The JSON record of one prepared sample.

    Attributes:
        caption: The caption that was embedded.
        source: Path of the video or image it came from.
        fps: Frame rate the clip was resampled to.
        frames: Frames of the clip (``4n + 1``).
        height: Clip height in pixels (after resizing to the bucket).
        width: Clip width in pixels.
        latent_shape: ``[C, F, H, W]`` of :data:`LATENTS`.
        text_len: Real tokens of the caption (rows of :data:`TEXT`).
        vae: Identity of the VAE (its directory name and config hash), recorded so generation decodes
            with the same one.
        text_encoder: Identity of the text encoder (same form).
        latents_mean: Per-channel mean subtracted from the raw latents.
        latents_std: Per-channel standard deviation they were divided by.
        format_version: :data:`FORMAT_VERSION` of the writer.
    """

    caption: str
    source: str
    fps: float
    frames: int
    height: int
    width: int
    latent_shape: tuple[int, int, int, int] = attrs.field(converter=tuple)
    text_len: int
    vae: str
    text_encoder: str
    latents_mean: tuple[float, ...] = attrs.field(converter=tuple)
    latents_std: tuple[float, ...] = attrs.field(converter=tuple)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """The record as one JSON object."""
        return json.dumps(attrs.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "sample") -> SampleMeta:
        """Parse a record written by :meth:`to_json`.

        Raises:
            ValueError: Naming ``where``, for invalid JSON, missing or unknown fields, or another format version.
        """
        try:
            record: Any = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{where}: {META} is not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: {META} must hold a JSON object")
        version = record.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{where}: sample format version {version!r}, this dfm reads version {FORMAT_VERSION}; "
                "prepare the data again with this version of `python -m dfm.app.prepare`"
            )
        names = {a.name for a in attrs.fields(cls)}
        missing, unknown = sorted(names - set(record)), sorted(set(record) - names)
        if missing or unknown:
            raise ValueError(f"{where}: {META} lacks fields {missing} / has unknown fields {unknown}")
        return cls(**record)


class BadSampleError(ValueError):
    """A prepared sample that cannot be used: undecodable tensors, an invalid record, or wrong shapes."""


@attrs.frozen(kw_only=True, eq=False)
class DecodedSample:
    """One checked sample: ``latents [C, F, H, W]``, ``text [L, D]`` (``L <= text_len``) and its caption."""

    latents: torch.Tensor
    text: torch.Tensor
    caption: str

    @property
    def shape_key(self) -> str:
        """``CxFxHxW``: samples with the same key may share a batch."""
        return "x".join(str(s) for s in self.latents.shape)


def decode_sample(tensors: Any, meta: Any, *, text_len: int, text_dim: int, where: str) -> DecodedSample:
    """Decode and check the :data:`TENSORS` bytes and :data:`META` record of one sample.

    Args:
        tensors: The safetensors bytes.
        meta: The JSON record (text or bytes).
        text_len: Text tokens the reader keeps (longer captions are cut).
        text_dim: Expected text width ``D``.
        where: Names the sample in errors (shard and key, or row).

    Raises:
        BadSampleError: Naming ``where``, for anything that does not match this format.
    """
    if not isinstance(tensors, bytes | bytearray | memoryview) or not isinstance(meta, str | bytes | bytearray):
        raise BadSampleError(f"{where}: lacks {TENSORS!r} bytes or a {META!r} record")
    try:
        record = SampleMeta.from_json(meta if isinstance(meta, str) else bytes(meta), where)
    except (ValueError, TypeError) as exc:
        raise BadSampleError(str(exc)) from None
    try:
        named = load(bytes(tensors))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise BadSampleError(f"{where}: {TENSORS} is not valid safetensors data ({exc})") from None
    latents, text = named.get(LATENTS), named.get(TEXT)
    if latents is None or text is None:
        raise BadSampleError(f"{where}: {TENSORS} must hold {LATENTS!r} and {TEXT!r}, has {sorted(named)}")
    _check_shapes(latents, text, record, text_dim, where)
    return DecodedSample(latents=latents, text=text[:text_len], caption=record.caption)


def _check_shapes(latents: torch.Tensor, text: torch.Tensor, record: SampleMeta, text_dim: int, where: str) -> None:
    if latents.ndim != 4 or tuple(latents.shape) != tuple(record.latent_shape):
        raise BadSampleError(
            f"{where}: latents have shape {tuple(latents.shape)}, "
            f"the record says {tuple(record.latent_shape)} [C,F,H,W]"
        )
    if text.ndim != 2 or text.shape[0] != record.text_len or text.shape[1] != text_dim:
        raise BadSampleError(
            f"{where}: text has shape {tuple(text.shape)}, expected [{record.text_len}, {text_dim}] "
            f"(text_len from the record, width = text_dim)"
        )
    if not latents.is_floating_point() or not text.is_floating_point():
        raise BadSampleError(f"{where}: latents and text must be floating tensors, got {latents.dtype}, {text.dtype}")


def pad_text(texts: Sequence[torch.Tensor], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[L_b, D]`` embeddings into ``[B, text_len, D]`` zero-padded, with the ``[B, text_len]`` mask."""
    dim, dtype = texts[0].shape[1], texts[0].dtype
    out = torch.zeros((len(texts), text_len, dim), dtype=dtype)
    mask = torch.zeros((len(texts), text_len), dtype=torch.bool)
    for b, t in enumerate(texts):
        out[b, : t.shape[0]] = t
        mask[b, : t.shape[0]] = True
    return out, mask
