"""In-memory adapters: ports implemented with Python objects, for users and unit tests (no files)."""

from dfm.adapters.memory.checkpoint import InMemoryCheckpointStore
from dfm.adapters.memory.data import InMemoryDataSource
from dfm.adapters.memory.tracking import InMemoryMetricsSink, InMemoryVideoWriter

__all__ = ["InMemoryCheckpointStore", "InMemoryDataSource", "InMemoryMetricsSink", "InMemoryVideoWriter"]
