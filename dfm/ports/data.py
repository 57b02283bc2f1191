"""Where training batches come from."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from dfm.domain.batch import Batch


@runtime_checkable
class DataSource(Protocol):
    """An iterator of this rank's micro-batches, resumable from a JSON-safe state."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]:
        """The position in the data (JSON-safe), saved in every checkpoint."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was taken."""
        ...
