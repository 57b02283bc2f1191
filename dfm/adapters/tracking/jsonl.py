"""Metrics as JSON Lines: one object per logged step, ``{"step": 10, "loss": 0.25, ...}``, one per line.

The file is appended to, so a resumed run continues the same ``metrics.jsonl``. Each line is written
in one call and flushed, so a crash loses at most the line being written; opening the file again drops
such a truncated last line (and says so with a warning and :attr:`JsonlMetricsSink.repaired`).

JSON has no NaN or infinity. A non-finite float is written as one of the strings ``"nan"``, ``"inf"``
or ``"-inf"`` (so every line is valid JSON and no information is lost); :func:`read_metrics` turns
those strings back into floats. ``None`` is written as ``null`` (the training loop's means over a log
interval whose every step was skipped).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import structlog
import torch

from dfm.adapters.tracking.files import write_text_atomic

NONFINITE: dict[str, float] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
"""The strings that stand for non-finite floats in the file."""

Scalar = bool | int | float | str | None

_BLOCK = 65536
_log = structlog.get_logger(__name__)


def to_python_scalar(key: str, value: object) -> Scalar:
    """A metric as a plain Python value: one-element tensors and numpy values become numbers.

    Args:
        key: The metric's name (for the error message).
        value: A number, a one-element tensor or numpy array, a string or ``None``.

    Returns:
        ``bool``, ``int``, ``float``, ``str`` or ``None``.

    Raises:
        ValueError: For a tensor/array of more than one element or a value of another type.
    """
    if isinstance(value, torch.Tensor | np.ndarray):
        if value.size == 1 if isinstance(value, np.ndarray) else value.numel() == 1:
            return value.item()
        raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"metric {key!r} must be a number, a one-element tensor or a string, got {type(value).__name__}")


def _encode(key: str, value: object) -> Scalar:
    scalar = to_python_scalar(key, value)
    if isinstance(scalar, float) and not math.isfinite(scalar):
        return "nan" if math.isnan(scalar) else ("inf" if scalar > 0 else "-inf")
    return scalar


def encode_record(step: int, metrics: Mapping[str, object]) -> str:
    """One JSON line (without the newline) for ``{"step": step, **metrics}``.

    Raises:
        ValueError: When ``metrics`` has a key ``"step"`` or a value :func:`to_python_scalar` refuses.
    """
    if "step" in metrics:
        raise ValueError("a metric may not be called 'step': the key holds the step number")
    record: dict[str, Scalar] = {"step": int(step)}
    record.update({str(key): _encode(str(key), value) for key, value in metrics.items()})
    return json.dumps(record, allow_nan=False, separators=(",", ":"))


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    return {key: NONFINITE.get(value, value) if isinstance(value, str) else value for key, value in record.items()}


def _last_line_start(file: IO[bytes], size: int) -> int:
    """The offset just after the last newline before ``size`` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - _BLOCK)
        file.seek(start)
        newline = file.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def repair_tail(path: Path) -> bool:
    """Drops a truncated last line (one without a newline that is not a complete JSON object).

    A complete object that only lacks its newline is kept and the newline added.

    Args:
        path: An existing JSONL file.

    Returns:
        Whether a truncated line was dropped.
    """
    with open(path, "rb+") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return False
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return False
        start = _last_line_start(file, size)
        file.seek(start)
        if _is_record(file.read()):
            file.write(b"\n")
            return False
        file.truncate(start)
        return True


def _step_of(path: Path, number: int, line: str) -> int:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{path}:{number} is not valid JSON ({err}); fix or move the file to resume") from err
    return int(record.get("step", -1)) if isinstance(record, dict) else -1


def _drop_after(path: Path, step: int) -> int:
    """Rewrites ``path`` without the records whose step is above ``step``; returns how many.

    The new content is written beside the file, synced, then renamed over it: when the write fails (a
    full disk, say) the ``OSError`` propagates and ``path`` keeps its old content.
    """
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for n, line in enumerate(lines, 1) if not line.strip() or _step_of(path, n, line) <= step]
    if len(kept) == len(lines):
        return 0
    write_text_atomic(path, "".join(kept))
    return len(lines) - len(kept)


class JsonlMetricsSink:
    """Appends one JSON object per logged step to a file (implements the ``MetricsSink`` port).

    Attributes:
        path: The JSONL file.
        repaired: Whether opening dropped a truncated last line left by a crash.
        dropped: How many records opening removed because of ``resume_step``.
    """

    def __init__(self, path: Path | str, *, resume_step: int | None = None) -> None:
        """Opens (creating parent directories) or continues ``path``.

        Args:
            path: The JSONL file; appended to when it exists.
            resume_step: The step a resumed run restarts from: records logged after it by the
                interrupted run are removed, so the file holds each step once. ``None`` keeps all.

        Raises:
            OSError: When the file cannot be created or rewritten (e.g. ``ENOSPC``); a rewrite that fails
                leaves the file as it was.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = self.path.is_file() and repair_tail(self.path)
        if self.repaired:
            _log.warning("metrics_truncated_line_dropped", path=str(self.path))
        self.dropped = _drop_after(self.path, resume_step) if resume_step is not None and self.path.is_file() else 0
        if self.dropped:
            _log.info("metrics_after_resume_step_dropped", path=str(self.path), records=self.dropped)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def log(self, step: int, metrics: Mapping[str, object]) -> None:
        """Writes ``{"step": step, **metrics}`` as one line and flushes it.

        Args:
            step: The training step.
            metrics: Numbers, one-element tensors or strings; non-finite floats become ``"nan"``/``"inf"``/``"-inf"``.

        Raises:
            ValueError: For a metric named ``step``, a non-scalar value, or a closed sink.
        """
        if self._file is None:
            raise ValueError(f"the metrics sink for {self.path} is closed")
        self._file.write(encode_record(step, metrics) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlMetricsSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Reads the records of a JSONL metrics file, ``"nan"``/``"inf"``/``"-inf"`` back as floats.

    A truncated last line (a crash mid-write) is skipped.

    Args:
        path: The JSONL file.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        ValueError: For a line (other than a truncated last one) that is not a JSON object; names file and line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines):  # no newline after it: cut short by a crash
                continue
            raise ValueError(f"{path}:{number} is not valid JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} is not a JSON object")
        records.append(_decode(record))
    return records
