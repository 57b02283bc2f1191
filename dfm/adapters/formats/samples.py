"""The prepared-sample format's codec: a sample's members written, and read back with their checks.

The format (member names, the :class:`~dfm.ports.samples.SampleMeta` record) is declared in
:mod:`dfm.ports.samples`; this module is its one implementation, shared by every adapter that writes or
reads prepared samples (``prepare``'s writer, the energon and Hugging Face sources, the fake data sets of
the benchmarks), so a sample is written, read and rejected identically everywhere.

Image-to-video: a reader given the model's :class:`~dfm.ports.samples.ImageCondition` checks each sample's
stored condition against it and completes it into the network's condition channels, the frame mask rebuilt
from the record (:func:`~dfm.domain.diffusion.image_condition.frame_mask`) before the condition latents
(:func:`~dfm.domain.diffusion.image_condition.condition_channels`); without one (a text-to-video model) the
stored condition is checked and left aside.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from dfm.domain.diffusion.image_condition import condition_channels, frame_mask
from dfm.ports.samples import (
    CONDITION,
    CONDITION_IMAGES,
    IMAGE,
    LATENTS,
    META,
    TENSORS,
    TEXT,
    BadSampleError,
    ImageCondition,
    SampleMeta,
)

_FLAG = "`python -m dfm.app.prepare --image-condition {kind} --image-encoder DIR`"


def encode_sample(
    latents: torch.Tensor,
    text: torch.Tensor,
    meta: SampleMeta,
    *,
    condition: torch.Tensor | None = None,
    image: torch.Tensor | None = None,
) -> dict[str, bytes]:
    """The two members of a sample: :data:`TENSORS` (safetensors of ``latents`` and ``text``, and for an
    image-to-video sample ``condition`` and ``image``) and :data:`META`.

    Raises:
        ValueError: ``condition`` and ``image`` given without the other, or not as ``meta.condition`` says.
    """
    if (condition is None) != (image is None) or (condition is None) != (meta.condition is None):
        raise ValueError("condition and image go together, exactly when the record names its condition")
    tensors = {LATENTS: latents.contiguous(), TEXT: text.contiguous()}
    if condition is not None and image is not None:
        tensors |= {CONDITION: condition.contiguous(), IMAGE: image.contiguous()}
    return {TENSORS: save(tensors), META: meta.to_json().encode()}


@attrs.frozen(kw_only=True, eq=False)
class DecodedSample:
    """One checked sample: ``latents [C, F, H, W]``, ``text [L, D]`` (``L <= text_len``) and its caption; for an
    image-to-video reader also the condition channels ``[T + C, F, H, W]`` (frame mask, condition latents) and the
    image features ``[n, R, D']``."""

    latents: torch.Tensor
    text: torch.Tensor
    caption: str
    condition: torch.Tensor | None = None
    image: torch.Tensor | None = None

    @property
    def shape_key(self) -> str:
        """``CxFxHxW``: samples with the same key may share a batch."""
        return "x".join(str(s) for s in self.latents.shape)


def decode_sample(
    tensors: Any,
    meta: Any,
    *,
    text_len: int,
    text_dim: int,
    where: str,
    image_condition: ImageCondition | None = None,
) -> DecodedSample:
    """Decode and check the :data:`~dfm.ports.samples.TENSORS` bytes and :data:`~dfm.ports.samples.META` record.

    Args:
        tensors: The safetensors bytes.
        meta: The JSON record (text or bytes).
        text_len: Text tokens the reader keeps (longer captions are cut).
        text_dim: Expected text width ``D``.
        where: Names the sample in errors (shard and key, or row).
        image_condition: An image-to-video model's condition: the sample must hold one that fits it, returned
            as condition channels and image features. ``None``: a stored condition is checked, not returned.

    Raises:
        BadSampleError: Naming ``where``, for anything that does not match this format (or ``image_condition``).
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
    _check_stored_condition(named, record, where)
    sample = DecodedSample(latents=latents, text=text[:text_len], caption=record.caption)
    if image_condition is None:
        return sample
    condition, image = _condition_inputs(named, record, image_condition, where)
    return attrs.evolve(sample, condition=condition, image=image)


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


def _check_stored_condition(named: Mapping[str, torch.Tensor], record: SampleMeta, where: str) -> None:
    """The stored condition and image features match the record (both absent for a text-to-video sample)."""
    condition, image = named.get(CONDITION), named.get(IMAGE)
    if record.condition is None:
        if condition is not None or image is not None:
            raise BadSampleError(
                f"{where}: {TENSORS} holds {CONDITION!r}/{IMAGE!r} but its record names no condition "
                "(condition, image_encoder, image_shape)"
            )
        return
    if condition is None or image is None:
        raise BadSampleError(
            f"{where}: the record names condition {record.condition!r} but {TENSORS} lacks {CONDITION!r} or "
            f"{IMAGE!r} (has {sorted(named)})"
        )
    if tuple(condition.shape) != tuple(record.latent_shape):
        raise BadSampleError(
            f"{where}: condition latents have shape {tuple(condition.shape)}, expected the latents' "
            f"{tuple(record.latent_shape)} [C,F,H,W]"
        )
    if tuple(image.shape) != tuple(record.image_shape or ()):
        raise BadSampleError(
            f"{where}: image features have shape {tuple(image.shape)}, the record says {record.image_shape} [n,R,D]"
        )
    if not condition.is_floating_point() or not image.is_floating_point():
        raise BadSampleError(
            f"{where}: condition and image must be floating tensors, got {condition.dtype}, {image.dtype}"
        )


def _condition_inputs(
    named: Mapping[str, torch.Tensor], record: SampleMeta, want: ImageCondition, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition channels ``[T + C, F, H, W]`` (the frame mask rebuilt) and image features of a checked sample."""
    if record.condition is None:
        raise BadSampleError(
            f"{where}: holds no image condition (prepared without --image-condition), but the model is "
            f"image-to-video (model.image_dim is set); prepare the data with {_FLAG.format(kind=want.kind)}"
        )
    if record.condition != want.kind:
        raise BadSampleError(
            f"{where}: conditioned on its {record.condition!r} frame(s), but the model takes {want.kind!r} "
            f"(model.pos_embed_seq_len is {'set' if want.kind == 'first_last' else 'unset'}); prepare the data "
            f"with {_FLAG.format(kind=want.kind)}"
        )
    condition, image = named[CONDITION], named[IMAGE]
    _check_image(tuple(image.shape), want, where)
    frames, latent_frames = record.frames, condition.shape[1]
    if frames != 1 + want.temporal_stride * (latent_frames - 1):
        raise BadSampleError(
            f"{where}: {frames} frames in {latent_frames} latent frames do not fit the model's temporal stride "
            f"{want.temporal_stride} (model.in_channels - 2 x model.out_channels): prepared with another VAE?"
        )
    mask = frame_mask(1, frames, tuple(condition.shape[-2:]), want.temporal_stride, last=want.kind == "first_last")
    return condition_channels(mask, condition[None])[0], image


def _check_image(shape: tuple[int, ...], want: ImageCondition, where: str) -> None:
    if shape[-1] != want.image_dim:
        raise BadSampleError(
            f"{where}: image features are {shape[-1]} wide, but model.image_dim is {want.image_dim}; prepare the "
            "data with the model's image encoder (--image-encoder) or set model.image_dim to match"
        )
    if want.image_tokens is not None and shape[1] != want.image_tokens:
        raise BadSampleError(
            f"{where}: {shape[1]} image tokens per image, but the first-last-frame model reads {want.image_tokens} "
            f"(model.pos_embed_seq_len = {2 * want.image_tokens}); prepare the data with the model's image encoder"
        )


def stack_condition(
    conditions: Sequence[torch.Tensor | None], images: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A batch's condition channels ``[B, T + C, F, H, W]`` and image features ``[nB, R, D']`` (sample by sample, as
    ``Batch.image`` holds them), or ``(None, None)`` for samples decoded without an image condition.

    Raises:
        BadSampleError: Image features of different shapes in one batch (a data set mixing image encoders).
    """
    if all(c is None for c in conditions):
        return None, None
    assert all(c is not None for c in conditions) and all(i is not None for i in images), "decoded with one reader"
    shapes = sorted({tuple(i.shape) for i in images if i is not None})
    if len(shapes) > 1:
        raise BadSampleError(
            f"samples of one batch have image features of shapes {shapes}: the data set mixes image encoders; "
            "prepare it with one --image-encoder"
        )
    return torch.stack(list(conditions)), torch.cat(list(images))  # type: ignore[arg-type]


def header_shapes(tensors: Any) -> dict[str, list[int]] | None:
    """Tensor name -> shape of safetensors bytes, from the header alone; ``None`` when the bytes are not readable."""
    if not isinstance(tensors, bytes | bytearray | memoryview) or len(tensors) < 8:
        return None
    size = int.from_bytes(bytes(tensors[:8]), "little")
    try:
        header = json.loads(bytes(tensors[8 : 8 + size]))
        return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def check_first_sample(
    tensors: Any, path: Path, *, text_dim: int | None, image_condition: ImageCondition | None = None
) -> None:
    """Refuse a data set whose (readable) first sample does not fit the model, before training starts.

    A bad sample is skipped or raises when it is read: only a readable one can prove a mismatch.

    Raises:
        ValueError: Naming ``path``: text embeddings of another width than ``text_dim``, or (``image_condition``)
            samples without an image condition or with one that does not fit the model, and how to fix it.
    """
    shapes = header_shapes(tensors)
    if shapes is None:
        return
    text = shapes.get(TEXT)
    if text_dim is not None and text is not None and len(text) == 2 and text[1] != text_dim:
        raise ValueError(
            f"{path}: the text embeddings are {text[1]} wide but the model expects text_dim={text_dim}; "
            "prepare the data with the model's text encoder or set model.text_dim to match"
        )
    if image_condition is None:
        return
    image = shapes.get(IMAGE)
    if CONDITION not in shapes or image is None:
        raise ValueError(
            f"{path}: the samples hold no image condition (prepared without --image-condition), but the model is "
            f"image-to-video (model.image_dim is set); prepare the data with "
            f"{_FLAG.format(kind=image_condition.kind)}, or train a text-to-video model"
        )
    if len(image) != 3:
        return
    kinds = {n: k for k, n in CONDITION_IMAGES.items()}
    if image[0] != image_condition.images:
        raise ValueError(
            f"{path}: the samples are conditioned on their {kinds.get(image[0], image[0])!r} frame(s), but the model "
            f"takes {image_condition.kind!r}; prepare the data with {_FLAG.format(kind=image_condition.kind)}"
        )
    try:
        _check_image(tuple(image), image_condition, f"{path}: the first sample")
    except BadSampleError as exc:
        raise ValueError(str(exc)) from None


def pad_text(texts: Sequence[torch.Tensor], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[L_b, D]`` embeddings into ``[B, text_len, D]`` zero-padded, with the ``[B, text_len]`` mask."""
    dim, dtype = texts[0].shape[1], texts[0].dtype
    out = torch.zeros((len(texts), text_len, dim), dtype=dtype)
    mask = torch.zeros((len(texts), text_len), dtype=torch.bool)
    for b, t in enumerate(texts):
        out[b, : t.shape[0]] = t
        mask[b, : t.shape[0]] = True
    return out, mask
