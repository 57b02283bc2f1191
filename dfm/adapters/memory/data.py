"""An in-memory data source: a fixed list of micro-batches, cycled, resumable by position."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dfm.domain.batch import Batch


class InMemoryDataSource:
    """Yields ``batches`` in order, forever (epoch after epoch); the position is its state.

    Args:
        batches: The micro-batches, in the order a training loop consumes them.
    """

    def __init__(self, batches: Sequence[Batch]) -> None:
        if not batches:
            raise ValueError("InMemoryDataSource needs at least one batch")
        self.batches = list(batches)
        self.position = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """``{"source": "memory", "position": n}``: how many batches were consumed."""
        return {"source": "memory", "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after ``state["position"]`` consumed batches."""
        if state.get("source") != "memory":
            raise ValueError(f"not an in-memory data source state: {dict(state)!r}")
        self.position = int(state["position"])
