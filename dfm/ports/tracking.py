"""Metrics and videos leaving the run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class MetricsSink(Protocol):
    """Receives one record per logged step."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class VideoWriter(Protocol):
    """Writes a video ``[T, H, W, 3]`` uint8 to a file."""

    def write(self, frames: torch.Tensor, path: Path, fps: int) -> Path: ...
