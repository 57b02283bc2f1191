"""The prepared-sample format: what ``python -m dfm.app.prepare`` writes and the data sources read.

One sample is two members (webdataset shard members, or columns of a Hugging Face dataset):

- :data:`TENSORS` (``"tensors.safetensors"``): safetensors bytes holding :data:`LATENTS`, the VAE latents
  ``[C, F, H, W]`` already normalised per channel, and :data:`TEXT`, the caption's text-encoder
  embeddings ``[L, D]`` trimmed to its ``L`` real tokens (``L = meta.text_len``, 0 for an empty caption).
- :data:`META` (``"meta.json"``): the JSON record :class:`SampleMeta`.

No pickle anywhere: tensors are safetensors, everything else JSON. The format's one codec (writing a
sample's members, and reading one with its checks, so every data source reads a sample, and rejects a bad
one, identically) is :mod:`dfm.adapters.formats.samples`.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

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
