"""Metrics sinks: JSON Lines (always available), TensorBoard (the optional extra ``tracking``), and none."""

from dfm.adapters.tracking.files import write_text_atomic
from dfm.adapters.tracking.jsonl import JsonlMetricsSink, read_metrics
from dfm.adapters.tracking.null import NullMetricsSink
from dfm.adapters.tracking.tensorboard import TensorBoardMetricsSink

__all__ = ["JsonlMetricsSink", "NullMetricsSink", "TensorBoardMetricsSink", "read_metrics", "write_text_atomic"]
