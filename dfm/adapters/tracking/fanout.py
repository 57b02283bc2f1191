"""One metrics sink that forwards every record to several (JSON Lines plus TensorBoard and/or W&B)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dfm.ports.tracking import MetricsSink


class FanOutMetricsSink:
    """Forwards ``log`` to every sink, ``log_videos`` to those that take videos; closes them all."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Gives the record to every sink in order."""
        for sink in self.sinks:
            sink.log(step, metrics)

    def log_videos(self, step: int, videos: Mapping[str, Path]) -> None:
        """Gives the videos (caption -> mp4 path) to each sink with a ``log_videos``."""
        for sink in self.sinks:
            log_videos = getattr(sink, "log_videos", None)
            if log_videos is not None:
                log_videos(step, videos)

    def close(self) -> None:
        """Closes every sink, even when one fails (the first error is raised after)."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # close the others before reporting
                errors.append(exc)
        if errors:
            raise errors[0]
