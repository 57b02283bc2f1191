"""The prepared-sample format's codec: a sample's members written, and read back with their checks.

The format (member names, the :class:`~dfm.ports.samples.SampleMeta` record) is declared in
:mod:`dfm.ports.samples`; this module is its one implementation, shared by every adapter that writes or
reads prepared samples (``prepare``'s writer, the energon and Hugging Face sources, the fake data sets of
the benchmarks), so a sample is written, read and rejected identically everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from dfm.ports.samples import LATENTS, META, TENSORS, TEXT, BadSampleError, SampleMeta


def encode_sample(latents: torch.Tensor, text: torch.Tensor, meta: SampleMeta) -> dict[str, bytes]:
    """The two members of a sample: :data:`TENSORS` (safetensors of ``latents`` and ``text``) and :data:`META`."""
    tensors = save({LATENTS: latents.contiguous(), TEXT: text.contiguous()})
    return {TENSORS: tensors, META: meta.to_json().encode()}


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
    """Decode and check the :data:`~dfm.ports.samples.TENSORS` bytes and :data:`~dfm.ports.samples.META` record.

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
