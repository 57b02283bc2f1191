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
