"""Metrics and sample videos to Weights & Biases (the optional extra ``tracking``).

One W&B run per dfm run directory: its id is kept in ``<run.dir>/wandb_run_id``, so a resumed run continues
the same W&B run (``resume="allow"``); its files go under ``<run.dir>/wandb/``. ``WANDB_MODE=offline`` (or
``disabled``) is honoured as W&B defines it: offline runs are written locally and uploaded later with
``wandb sync``; no network is needed.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dfm.adapters.tracking.files import write_text_atomic
from dfm.adapters.tracking.jsonl import to_python_scalar

ID_FILE = "wandb_run_id"
_MISSING = "tracking.wandb needs the wandb package; install the tracking extra: pip install 'dfm[tracking]'"


def check_wandb() -> None:
    """Raise ``ImportError`` naming the extra unless ``wandb`` can be imported."""
    if importlib.util.find_spec("wandb") is None:
        raise ImportError(_MISSING)


class WandbMetricsSink:
    """Logs each record's numeric metrics at its step, and sample videos (implements the ``MetricsSink`` port).

    Args:
        run_dir: The dfm run directory (holds the W&B id and the ``wandb/`` files).
        project: W&B project.
        name: Display name of the run.
        tags: W&B tags.
        entity: W&B entity (user or team); ``None``: the account's default.
        config: The resolved training config, shown with the run.

    Raises:
        ImportError: When wandb is not installed, naming the ``tracking`` extra.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        project: str,
        name: str,
        tags: Sequence[str] = (),
        entity: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        check_wandb()
        import wandb

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        self._run: Any | None = wandb.init(
            project=project,
            name=name,
            tags=list(tags),
            entity=entity,
            config=dict(config or {}),
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            settings=wandb.Settings(console="off", quiet=True),
        )
        if not id_file.is_file():
            write_text_atomic(id_file, run_id + "\n")
        self.run_id = run_id

    def log(self, step: int, metrics: Mapping[str, object]) -> None:
        """Logs the numeric metrics (strings and ``None`` skipped) at ``step``.

        Raises:
            ValueError: For a non-scalar value, or a closed sink.
        """
        run = self._open()
        values = {}
        for key, value in metrics.items():
            scalar = to_python_scalar(key, value)
            if isinstance(scalar, int | float):
                values[key] = scalar
        run.log(values, step=int(step))

    def log_videos(self, step: int, videos: Mapping[str, Path]) -> None:
        """Logs mp4 files (caption -> path) as W&B videos at ``step``, under ``samples/``."""
        import wandb

        run = self._open()
        run.log(
            {"samples": [wandb.Video(str(path), caption=caption, format="mp4") for caption, path in videos.items()]},
            step=int(step),
        )

    def close(self) -> None:
        """Finishes the W&B run (idempotent)."""
        if self._run is not None:
            self._run.finish()
            self._run = None

    def _open(self) -> Any:
        if self._run is None:
            raise ValueError(f"the W&B sink of {self.run_dir} is closed")
        return self._run
