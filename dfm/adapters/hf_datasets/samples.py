"""Decoding and checking one prepared sample (:mod:`dfm.ports.samples`) read from a Hugging Face dataset row."""

from __future__ import annotations

import json
from typing import Any

from dfm.adapters.formats.samples import DecodedSample, decode_sample, pad_text
from dfm.ports.samples import META, TENSORS, TEXT, BadSampleError

__all__ = ["BadSampleError", "Decoded", "decode_row", "pad_text", "text_width"]


Decoded = DecodedSample
"""One checked sample (the format's :class:`~dfm.adapters.formats.samples.DecodedSample`)."""


def decode_row(row: dict[str, Any], *, text_len: int, text_dim: int, where: str) -> DecodedSample:
    """Decode the :data:`~dfm.ports.samples.TENSORS` and :data:`~dfm.ports.samples.META` columns of a row.

    Raises:
        BadSampleError: Naming ``where``, for anything that does not match :mod:`dfm.ports.samples`.
    """
    return decode_sample(row.get(TENSORS), row.get(META), text_len=text_len, text_dim=text_dim, where=where)


def text_width(tensors: object) -> int | None:
    """``D`` of the ``text`` tensor named in a safetensors header; ``None`` when the bytes are not readable."""
    if not isinstance(tensors, bytes | bytearray | memoryview) or len(tensors) < 8:
        return None
    raw = bytes(tensors[:8])
    size = int.from_bytes(raw, "little")
    try:
        shape = json.loads(bytes(tensors[8 : 8 + size]))[TEXT]["shape"]
    except (ValueError, KeyError, TypeError):
        return None
    return int(shape[1]) if isinstance(shape, list) and len(shape) == 2 else None
