"""Metrics sinks: JSON Lines (always available), TensorBoard (the optional extra ``tracking``), and none; the
training curves as a PNG (the optional extra ``plot``)."""

from dfm.adapters.tracking.curves import curves, save_curves_png
from dfm.adapters.tracking.files import write_text_atomic
from dfm.adapters.tracking.jsonl import JsonlMetricsSink, read_metrics
from dfm.adapters.tracking.null import NullMetricsSink
from dfm.adapters.tracking.tensorboard import TensorBoardMetricsSink

__all__ = [
    "JsonlMetricsSink",
    "NullMetricsSink",
    "TensorBoardMetricsSink",
    "curves",
    "read_metrics",
    "save_curves_png",
    "write_text_atomic",
]
