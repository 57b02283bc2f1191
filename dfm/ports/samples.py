"""The prepared-sample format: what ``python -m dfm.app.prepare`` writes and the data sources read.

One sample is two members (webdataset shard members, or columns of a Hugging Face dataset):

- :data:`TENSORS` (``"tensors.safetensors"``): safetensors bytes holding :data:`LATENTS`, the VAE latents
  ``[C, F, H, W]`` already normalised per channel, and :data:`TEXT`, the caption's text-encoder
  embeddings ``[L, D]`` trimmed to its ``L`` real tokens (``L = meta.text_len``, 0 for an empty caption).
  Image-to-video samples (``prepare --image-condition``) also hold :data:`CONDITION`, the latents of the
  condition video ``[C, F, H, W]`` (same VAE, same normalisation, same shape as the latents), and
  :data:`IMAGE`, the image encoder's features of the conditioning frame(s) ``[n, R, D']``.
- :data:`META` (``"meta.json"``): the JSON record :class:`SampleMeta`.

The frame mask that goes with the condition latents into the network is not stored: a reader rebuilds it
from the record's ``frames`` and ``condition`` and the model's temporal stride
(:func:`~dfm.domain.diffusion.image_condition.frame_mask`).

No pickle anywhere: tensors are safetensors, everything else JSON. The format's one codec (writing a
sample's members, and reading one with its checks, so every data source reads a sample, and rejects a bad
one, identically) is :mod:`dfm.adapters.formats.samples`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import attrs

FORMAT_VERSION = 1
"""Bumped when the record changes incompatibly; readers refuse other versions with a clear error. Fields added
compatibly (:data:`OPTIONAL_FIELDS`) leave it unchanged: records without them read as before."""
TENSORS = "tensors.safetensors"
"""Member / column with the safetensors bytes."""
META = "meta.json"
"""Member / column with the JSON record."""
LATENTS = "latents"
"""Tensor name of the normalised latents ``[C, F, H, W]``."""
TEXT = "text"
"""Tensor name of the trimmed text embeddings ``[L, D]``."""
CONDITION = "condition"
"""Image-to-video: tensor name of the normalised latents of the condition video ``[C, F, H, W]``: the clip's first
frame, zeros, (and its last frame), as :func:`~dfm.domain.diffusion.image_condition.condition_pixels` builds it."""
IMAGE = "image"
"""Image-to-video: tensor name of the image features ``[n, R, D']`` of the ``n`` conditioning frames (first, last)."""

ConditionKind = Literal["first", "first_last"]
"""Which frames of a clip condition it: its first (image-to-video) or its first and last (first-last-frame)."""
CONDITION_IMAGES: dict[str, int] = {"first": 1, "first_last": 2}
"""Conditioning frames (rows ``n`` of :data:`IMAGE`) of each condition kind."""
OPTIONAL_FIELDS = ("condition", "image_encoder", "image_shape")
"""Fields of :class:`SampleMeta` a record may lack (samples written before them, or text-to-video ones)."""


def _optional_shape(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)


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
        condition: Image-to-video: which frames condition the clip (:data:`ConditionKind`); the sample then
            holds :data:`CONDITION` (shape ``latent_shape``) and :data:`IMAGE`. ``None`` (absent from the
            JSON): text-to-video.
        image_encoder: Image-to-video: identity of the image encoder of :data:`IMAGE` (same form as ``vae``).
        image_shape: Image-to-video: ``[n, R, D']`` of :data:`IMAGE` (``n`` = 1 for ``first``, 2 for
            ``first_last``).

    Raises:
        ValueError: ``condition``, ``image_encoder`` and ``image_shape`` not set together, an unknown
            ``condition``, or an ``image_shape`` that does not fit it.
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
    condition: ConditionKind | None = None
    image_encoder: str | None = None
    image_shape: tuple[int, int, int] | None = attrs.field(default=None, converter=_optional_shape)

    def __attrs_post_init__(self) -> None:
        given = [name for name in OPTIONAL_FIELDS if getattr(self, name) is not None]
        if given and len(given) != len(OPTIONAL_FIELDS):
            raise ValueError(f"{META}: {list(OPTIONAL_FIELDS)} go together (image-to-video), got only {given}")
        if self.condition is None:
            return
        if self.condition not in CONDITION_IMAGES:
            raise ValueError(f"{META}: condition must be one of {sorted(CONDITION_IMAGES)}, got {self.condition!r}")
        images = CONDITION_IMAGES[self.condition]
        if self.image_shape is None or len(self.image_shape) != 3 or self.image_shape[0] != images:
            raise ValueError(
                f"{META}: image_shape must be [{images}, R, D] for condition {self.condition!r}, got {self.image_shape}"
            )

    def to_json(self) -> str:
        """The record as one JSON object (optional fields that are unset are left out)."""
        record = attrs.asdict(self)
        for name in OPTIONAL_FIELDS:
            if record[name] is None:
                del record[name]
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "sample") -> SampleMeta:
        """Parse a record written by :meth:`to_json` (a record without the :data:`OPTIONAL_FIELDS` reads too).

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
        missing, unknown = sorted(names - set(record) - set(OPTIONAL_FIELDS)), sorted(set(record) - names)
        if missing or unknown:
            raise ValueError(f"{where}: {META} lacks fields {missing} / has unknown fields {unknown}")
        try:
            return cls(**record)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


@attrs.frozen(kw_only=True)
class ImageCondition:
    """What an image-to-video model reads beside the latents: how a reader of prepared samples checks each
    sample's condition and completes it into the network's condition channels (frame mask + condition latents).

    Attributes:
        kind: The frames the model is conditioned on (first-last-frame models: ``first_last``).
        temporal_stride: Channels of the frame mask (the VAE's temporal stride: the model's ``in_channels`` minus
            twice its ``out_channels``).
        image_dim: Width ``D'`` of the image features the model reads (``model.image_dim``).
        image_tokens: Rows ``R`` per image the model needs (first-last-frame: ``pos_embed_seq_len / 2``);
            ``None``: any.
    """

    kind: ConditionKind = attrs.field(validator=attrs.validators.in_(tuple(CONDITION_IMAGES)))
    temporal_stride: int = attrs.field(validator=attrs.validators.ge(1))
    image_dim: int = attrs.field(validator=attrs.validators.ge(1))
    image_tokens: int | None = None

    @property
    def images(self) -> int:
        """Conditioning frames per sample (rows ``n`` of :data:`IMAGE`)."""
        return CONDITION_IMAGES[self.kind]


class BadSampleError(ValueError):
    """A prepared sample that cannot be used: undecodable tensors, an invalid record, or wrong shapes."""
