"""Where training state goes: the ``CheckpointStore`` port."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or from another model."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files fail verification before anything is loaded from them: incomplete (no
    manifest), a file missing, truncated or changed, or unreadable. An older checkpoint may still serve."""


@attrs.frozen(kw_only=True)
class CheckpointInfo:
    """One published checkpoint."""

    step: int
    """The optimizer step it was taken after."""
    path: Path
    """Its directory (or an in-memory key shown as a path)."""


@attrs.frozen(kw_only=True)
class CheckpointCandidate:
    """A checkpoint a resume may start from, with what a cheap look at it found wrong."""

    info: CheckpointInfo
    problem: str | None = None
    """Why it cannot be used (no manifest, a file of the wrong size...), found without reading its data; None
    when it looks intact (its content is verified when loaded)."""


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

    def candidates(self) -> list[CheckpointCandidate]:
        """The checkpoints to try when resuming, in order (the one ``latest`` names first, then older ones,
        newest first), each with its problem if a cheap check finds one."""
        ...


@runtime_checkable
class CheckpointIO(Protocol):
    """How a checkpoint's tensors are written and read (collective under a process group).

    The store splits a state into leaves under dotted keys: those the IO ``owns`` (tensors for torch DCP,
    ``ShardedTensor`` s for megatron's ``dist_checkpointing``) go through the IO, every other value is
    the store's (JSON). A :class:`CheckpointStore` adds the atomic publish, the manifest, retention and
    verification around it. Nothing an IO writes or reads may be a pickle.
    """

    def owns(self, value: object) -> bool:
        """Whether ``value`` is a leaf this IO stores."""
        ...

    def save(self, leaves: dict[str, Any], directory: Path) -> None:
        """Write ``{key: leaf}`` into the new ``directory``; files durable on return."""
        ...

    def load(self, leaves: dict[str, Any], directory: Path) -> dict[str, Any]:
        """Load ``{key: leaf}`` from ``directory``; returns each key's loaded value (the caller's tensor,
        filled in place, or a new one)."""
        ...

    def load_legacy(self, state: dict[str, Any], directory: Path) -> None:
        """Fill the nested ``state`` from a checkpoint of layout version 1 through readers that refuse
        anything but plain data (that layout stored pickles)."""
        ...
