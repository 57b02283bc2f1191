"""Decoding and checking one prepared sample (:mod:`dfm.ports.samples`) read from a Hugging Face dataset row."""

from __future__ import annotations

from typing import Any

from dfm.adapters.formats.samples import DecodedSample, decode_sample, header_shapes, pad_text, stack_condition
from dfm.ports.samples import META, TENSORS, TEXT, BadSampleError, ImageCondition

__all__ = ["BadSampleError", "Decoded", "decode_row", "pad_text", "stack_condition", "text_width"]


Decoded = DecodedSample
"""One checked sample (the format's :class:`~dfm.adapters.formats.samples.DecodedSample`)."""


def decode_row(
    row: dict[str, Any], *, text_len: int, text_dim: int, where: str, image_condition: ImageCondition | None = None
) -> DecodedSample:
    """Decode the :data:`~dfm.ports.samples.TENSORS` and :data:`~dfm.ports.samples.META` columns of a row (for an
    image-to-video model, with its condition: :func:`~dfm.adapters.formats.samples.decode_sample`).

    Raises:
        BadSampleError: Naming ``where``, for anything that does not match :mod:`dfm.ports.samples`.
    """
    return decode_sample(
        row.get(TENSORS),
        row.get(META),
        text_len=text_len,
        text_dim=text_dim,
        where=where,
        image_condition=image_condition,
    )


def text_width(tensors: object) -> int | None:
    """``D`` of the ``text`` tensor named in a safetensors header; ``None`` when the bytes are not readable."""
    shape = (header_shapes(tensors) or {}).get(TEXT)
    return int(shape[1]) if shape is not None and len(shape) == 2 else None
