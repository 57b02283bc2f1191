"""Metrics to TensorBoard event files through ``torch.utils.tensorboard`` (the optional extra ``tracking``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dfm.adapters.tracking.jsonl import to_python_scalar

_MISSING = (
    "TensorBoardMetricsSink needs the tensorboard package; install the tracking extra: pip install 'dfm[tracking]'"
)


def _tensorboard_available() -> bool:
    """Whether the tensorboard package is installed (tests replace this to exercise the error)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardMetricsSink:
    """Writes every numeric metric as a TensorBoard scalar (implements the ``MetricsSink`` port).

    Strings and ``None`` are skipped (TensorBoard scalars are numbers); NaN and infinities are written
    as they are (TensorBoard shows them).
    """

    def __init__(self, log_dir: Path | str, *, flush_secs: int = 30) -> None:
        """Opens an event file in ``log_dir`` (created if missing).

        Args:
            log_dir: The TensorBoard log directory (``tensorboard --logdir`` it).
            flush_secs: How often pending events are written to disk.

        Raises:
            ImportError: When tensorboard is not installed, naming the ``tracking`` extra.
        """
        if not _tensorboard_available():
            raise ImportError(_MISSING)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer: Any | None = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log(self, step: int, metrics: Mapping[str, object]) -> None:
        """Adds one scalar per numeric metric at ``step``.

        Raises:
            ValueError: For a non-scalar value, or a closed sink.
        """
        if self._writer is None:
            raise ValueError(f"the TensorBoard sink for {self.log_dir} is closed")
        for key, value in metrics.items():
            scalar = to_python_scalar(key, value)
            if isinstance(scalar, int | float):
                self._writer.add_scalar(key, float(scalar), global_step=int(step))

    def close(self) -> None:
        """Flushes and closes the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
