"""Where training state goes: the ``CheckpointStore`` port."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or from another model."""


@attrs.frozen(kw_only=True)
class CheckpointInfo:
    """One published checkpoint."""

    step: int
    """The optimizer step it was taken after."""
    path: Path
    """Its directory (or an in-memory key shown as a path)."""


@runtime_checkable
class CheckpointStore(Protocol):
    """Atomic save (write aside, then publish), load, latest, list."""

    def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> CheckpointInfo:
        """Write ``state`` (tensors, nested dicts) and JSON-safe ``meta``; publish only when complete."""
        ...

    def load(self, where: CheckpointInfo | Path, state: dict[str, Any]) -> dict[str, Any]:
        """Fill ``state`` in place from a checkpoint (verified first) and return its ``meta``."""
        ...

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint, or None."""
        ...

    def list(self) -> list[CheckpointInfo]:
        """All complete checkpoints, oldest first."""
        ...


@runtime_checkable
class CheckpointIO(Protocol):
    """How a checkpoint directory's tensors are written and read (collective under a process group).

    The default is torch DCP; the megatron runtime's state (``ShardedTensor`` s of
    ``megatron.core.dist_checkpointing``) goes through megatron's own. A :class:`CheckpointStore` adds
    the atomic publish, the manifest, retention and verification around it.
    """

    def save(self, state: dict[str, Any], directory: Path) -> None:
        """Write ``state`` into the (new, empty) ``directory``; files durable on return."""
        ...

    def load(self, state: dict[str, Any], directory: Path) -> None:
        """Fill ``state`` in place from ``directory``."""
        ...
