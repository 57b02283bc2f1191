"""The ``data`` section: where samples come from and their size in pixels."""

from __future__ import annotations

from typing import Literal

import attrs
from attrs import validators as v

from dfm.app.config.checks import choice, non_empty, non_negative, optional, positive
from dfm.app.config.errors import FieldError

DataSourceName = Literal["synthetic", "mock", "energon", "hf_datasets"]
_NEEDS_PATH = ("energon", "hf_datasets")


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

    def __attrs_post_init__(self) -> None:
        if self.source in _NEEDS_PATH and self.path is None:
            raise FieldError("path", f"required when data.source is {self.source!r} (set data.path=DIR)")
