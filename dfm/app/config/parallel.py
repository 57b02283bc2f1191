"""The ``parallel`` section: how the world of ranks is split (tensor x context x pipeline x data)."""

from __future__ import annotations

import attrs

from dfm.app.config.checks import optional, positive
from dfm.app.config.errors import FieldError


def _shard_size(_inst: object, attr: attrs.Attribute, value: int) -> None:
    if value != -1 and value < 1:
        raise ValueError(f"{attr.name} must be -1 (infer) or >= 1, got {value!r}")


@attrs.frozen(kw_only=True)
class ParallelConfig:
    """Parallel layout; the product of all sizes must equal the world size (checked by the runtime)."""

    tensor: int = attrs.field(default=1, validator=positive)
    """Tensor-parallel size (Megatron TP / DTensor colwise-rowwise sharding)."""
    context: int = attrs.field(default=1, validator=positive)
    """Context-parallel size: ranks that split one sample's sequence."""
    pipeline: int = attrs.field(default=1, validator=positive)
    """Pipeline-parallel size (Megatron runtime)."""
    virtual_pipeline: int | None = attrs.field(default=None, validator=optional(positive))
    """Virtual pipeline stages per rank (interleaved schedule); ``null`` for none."""
    data_replicate: int = attrs.field(default=1, validator=positive)
    """Data-parallel ranks that hold full replicas of each shard (HSDP outer dimension)."""
    data_shard: int = attrs.field(default=-1, validator=_shard_size)
    """Data-parallel ranks that shard parameters (FSDP); ``-1`` infers it from the world size."""

    def __attrs_post_init__(self) -> None:
        if self.virtual_pipeline is not None and self.virtual_pipeline > 1 and self.pipeline == 1:
            raise FieldError("virtual_pipeline", f"needs pipeline > 1, got pipeline={self.pipeline}")
