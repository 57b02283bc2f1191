"""The ``data`` section: where samples come from and their size in pixels."""

from __future__ import annotations

from typing import Literal

import attrs
from attrs import validators as v

from dfm.app.config.checks import choice, non_empty, non_negative, optional, positive, unit_interval
from dfm.app.config.errors import FieldError

DataSourceName = Literal["synthetic", "mock", "energon", "hf_datasets"]
_NEEDS_PATH = ("energon", "hf_datasets")


def _radius_range(_inst: object, attr: attrs.Attribute, value: tuple[float, float]) -> None:
    if len(value) != 2 or not 0.0 < value[0] <= value[1] <= 0.5:
        raise ValueError(f"{attr.name} must be [low, high] with 0 < low <= high <= 0.5, got {list(value)}")


@attrs.frozen(kw_only=True)
class SyntheticConfig:
    """What the procedural videos of ``data.source: synthetic`` show (see ``dfm/adapters/synthetic/videos.py``)."""

    background: bool = False
    """Dim coloured backgrounds, named in the caption ("... on a navy background"); otherwise plain black."""
    placement: float = attrs.field(default=1.0, validator=unit_interval)
    """How far the start position varies, as a fraction of the range that keeps the shape inside the
    frame: 1.0 anywhere, 0.0 always centred (the clip is then fixed by its caption and radius)."""
    radius: tuple[float, float] = attrs.field(
        default=(0.14, 0.19), converter=lambda x: tuple(float(r) for r in x), validator=_radius_range
    )
    """Range ``[low, high]`` the shape radius is drawn from, as fractions of ``min(height, width)``."""


@attrs.frozen(kw_only=True)
class DataConfig:
    """Training data: the source and the clip size (pixels) each sample is brought to."""

    source: DataSourceName = attrs.field(default="synthetic", validator=choice(DataSourceName))
    """``synthetic``: procedural videos; ``mock``: random latents of the right shape (benchmarks);
    ``energon``: webdataset shards prepared by ``megatron-energon``; ``hf_datasets``: a local HF dataset."""
    path: str | None = attrs.field(default=None, validator=optional(non_empty))
    """Dataset directory, required for ``energon`` and ``hf_datasets``."""
    frames: int = attrs.field(default=17, validator=positive)
    """Frames per clip."""
    height: int = attrs.field(default=64, validator=positive)
    """Frame height in pixels."""
    width: int = attrs.field(default=64, validator=positive)
    """Frame width in pixels."""
    fps: float = attrs.field(default=16.0, validator=v.gt(0.0))
    """Frames per second clips are resampled to."""
    text_len: int = attrs.field(default=512, validator=positive)
    """Text tokens per caption (padded or truncated)."""
    num_workers: int = attrs.field(default=2, validator=non_negative)
    """Data-loader worker processes per rank (0 loads in the training process)."""
    synthetic: SyntheticConfig = attrs.field(factory=SyntheticConfig)
    """Scene options of the ``synthetic`` source."""
    shuffle_buffer: int = attrs.field(default=100, validator=non_negative)
    """``energon``: samples in each loader worker's shuffle buffer (0: read shards in order)."""
    max_samples_per_sequence: int = attrs.field(default=100, validator=positive)
    """``energon``: samples read in a row from one shard before switching to another."""
    packing: bool = False
    """``energon``: each micro-batch's samples, of any latent shapes, run as one packed sequence (attention
    never crosses samples; per-sample noise levels) instead of batches grouped by shape. Runtimes
    ``local`` and ``fsdp2`` (without context parallelism)."""
    strict: bool = False
    """``energon`` / ``hf_datasets``: stop at the first bad sample (undecodable, wrong shape) instead of
    skipping it; skipped samples are logged and counted either way."""

    def __attrs_post_init__(self) -> None:
        if self.source in _NEEDS_PATH and self.path is None:
            raise FieldError("path", f"required when data.source is {self.source!r} (set data.path=DIR)")
