"""A metrics sink that keeps nothing: what every rank but the main one logs to."""

from __future__ import annotations

from collections.abc import Mapping


class NullMetricsSink:
    """Discards every record (implements the ``MetricsSink`` port).

    Under ``torchrun`` every rank computes the same reduced metrics; only global rank 0 writes them, so
    the run directory's ``metrics.jsonl`` holds one record per step.
    """

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Drops the record."""

    def close(self) -> None:
        """Nothing to release."""
