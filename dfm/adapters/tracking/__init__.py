"""Metrics sinks: JSON Lines (always available), TensorBoard and Weights & Biases (the optional extra
``tracking``), several at once, and none; the training curves as a PNG (the optional extra ``plot``)."""

from dfm.adapters.tracking.curves import curves, save_curves_png
from dfm.adapters.tracking.fanout import FanOutMetricsSink
from dfm.adapters.tracking.files import write_text_atomic
from dfm.adapters.tracking.jsonl import JsonlMetricsSink, read_metrics
from dfm.adapters.tracking.null import NullMetricsSink
from dfm.adapters.tracking.tensorboard import TensorBoardMetricsSink
from dfm.adapters.tracking.wandb import WandbMetricsSink

__all__ = [
    "FanOutMetricsSink",
    "JsonlMetricsSink",
    "NullMetricsSink",
    "TensorBoardMetricsSink",
    "WandbMetricsSink",
    "curves",
    "read_metrics",
    "save_curves_png",
    "write_text_atomic",
]
