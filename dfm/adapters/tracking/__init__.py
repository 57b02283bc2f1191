"""Metrics sinks: JSON Lines (always available) and TensorBoard (the optional extra ``tracking``)."""

from dfm.adapters.tracking.jsonl import JsonlMetricsSink, read_metrics
from dfm.adapters.tracking.tensorboard import TensorBoardMetricsSink

__all__ = ["JsonlMetricsSink", "TensorBoardMetricsSink", "read_metrics"]
