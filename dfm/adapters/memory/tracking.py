"""In-memory metrics sink and video writer: run services and unit tests with no files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def _plain(value: object) -> object:
    """A one-element tensor as a Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


class InMemoryMetricsSink:
    """Records every ``log`` call (implements the ``MetricsSink`` port).

    Attributes:
        records: ``(step, metrics)`` in call order; one-element tensors stored as Python numbers.
        closed: Whether ``close`` was called.
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, object]]] = []
        self.closed = False

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records a copy of ``metrics`` at ``step``."""
        if self.closed:
            raise ValueError("the in-memory metrics sink is closed")
        self.records.append((int(step), {key: _plain(value) for key, value in metrics.items()}))

    def close(self) -> None:
        """Marks the sink closed."""
        self.closed = True

    def series(self, key: str) -> list[tuple[int, object]]:
        """``(step, value)`` of one metric, for the records that have it."""
        return [(step, metrics[key]) for step, metrics in self.records if key in metrics]


class InMemoryVideoWriter:
    """Keeps written videos in a dict by path (implements the ``VideoWriter`` port); writes no file.

    Attributes:
        videos: ``path -> frames`` (uint8 ``[T, H, W, 3]`` CPU copies); a later write to a path replaces it.
        fps: ``path -> fps`` given with each video.
    """

    def __init__(self) -> None:
        self.videos: dict[Path, torch.Tensor] = {}
        self.fps: dict[Path, float] = {}

    def write(self, frames: torch.Tensor, path: Path, fps: float) -> Path:
        """Stores a copy of ``frames`` under ``path``.

        Raises:
            ValueError: For frames that are not uint8 ``[T, H, W, 3]``, like a file writer would.
        """
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be a uint8 tensor [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        path = Path(path)
        self.videos[path] = frames.detach().cpu().clone()
        self.fps[path] = fps
        return path
