"""``CheckpointIO`` on ``megatron.core.dist_checkpointing`` (its ``torch_dist`` backend, DCP underneath).

The megatron runtime's state holds ``ShardedTensor`` s keyed like the local runtime's DCP keys
(``runtime.model.<parameter name>``), so the weights of a megatron checkpoint also load into one
process with the ``local`` runtime (``generate``, ``convert export``), and a checkpoint loads at
another tensor/pipeline layout. Plain values (scheduler counters, the RNG state) are megatron's
"common" state, written by rank 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedBase


def _fill(target: MutableMapping[Any, Any], loaded: Mapping[Any, Any]) -> None:
    """Replace ``target``'s leaves by ``loaded``'s in place (nested dicts and lists kept)."""
    for key, value in loaded.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), MutableMapping):
            _fill(target[key], value)
        else:
            target[key] = value


class _NotOverwriting(logging.Filter):
    """Drops megatron's "Overwriting old incomplete / corrupted checkpoint" warning: the store's fresh
    temporary directory already holds its ``meta.json`` when megatron writes there (nothing is overwritten)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Overwriting old incomplete" not in record.getMessage()


class _RngOnlyDiffers(logging.Filter):
    """Drops megatron's "common state dict differs" warning when the only difference is ``rng.torch``.

    Each rank's torch RNG state differs by design; like a DCP checkpoint, the common state keeps rank 0's
    (every training draw is keyed by seed, step and sample, so resuming does not depend on it). Any other
    difference is still reported.
    """

    _ONLY_RNG = re.compile(
        r"Keys only on rank 0: \[\], Keys only on \d+: \[\], Mismatched keys: \[\(\('rng', 'torch'\),"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (self._ONLY_RNG.search(message) and message.count("((") == 1)


logging.getLogger("megatron.core.dist_checkpointing.serialization").addFilter(_NotOverwriting())
logging.getLogger("megatron.core.dist_checkpointing.validation").addFilter(_RngOnlyDiffers())


class DistCheckpointIO:
    """Save and load sharded state dicts with megatron's ``dist_checkpointing`` (collective)."""

    def save(self, state: dict[str, Any], directory: Path) -> None:
        """``dist_checkpointing.save`` into ``directory`` (the store's temporary directory)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(state, str(directory))

    def load(self, state: dict[str, Any], directory: Path) -> None:
        """``dist_checkpointing.load``; ``state``'s sharded leaves become the loaded tensors (in place)."""
        loaded = dist_checkpointing.load(state, str(directory), strict="raise_all")
        _fill(state, loaded)


def is_sharded(value: object) -> bool:
    """Whether ``value`` is a megatron sharded-state leaf (``ShardedTensor``, ``ShardedObject``...)."""
    return isinstance(value, ShardedBase)
